variable "name" {
  description = "Name of the NLB, its target groups (NAME-https, NAME-http) and security groups."
  type        = string
  default     = "edgemux"

  validation {
    # Target group names are at most 32 characters, and "-https" takes 6.
    condition     = can(regex("^[a-zA-Z0-9]([a-zA-Z0-9-]{0,24}[a-zA-Z0-9])?$", var.name))
    error_message = "name: letters, digits and inner hyphens, at most 26 characters."
  }
}

variable "vpc_id" {
  description = "VPC holding the NLB subnets and the edgemux instances."
  type        = string
}

variable "subnet_ids" {
  description = "Public subnets for the NLB, one per availability zone. Their CIDRs are edgemux's trusted_proxies (output nlb_subnet_cidrs)."
  type        = list(string)
}

variable "instance_ids" {
  description = "EC2 instances running edgemux on ports 443 and 80 (deploy/systemd)."
  type        = list(string)
}

variable "client_cidrs" {
  description = "IPv4 CIDRs that may connect to the NLB on 443 and 80."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "admin_port" {
  description = "edgemux's admin port (admin.bind), opened to the VPC's CIDR only, for Prometheus."
  type        = number
  default     = 9090
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
