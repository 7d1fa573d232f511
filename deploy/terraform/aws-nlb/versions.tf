terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # NLB security groups and aws_vpc_security_group_*_rule need 5.x.
      version = ">= 5.20"
    }
  }
}
