terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # NLB security groups and aws_vpc_security_group_*_rule need 5.x;
      # target_health_state.unhealthy_draining_interval arrived in 5.62.
      version = ">= 5.62"
    }
  }
}
