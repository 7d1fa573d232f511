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
  description = "EC2 instances you run edgemux on yourself, on ports 443 and 80 (deploy/systemd); registered as they are."
  type        = list(string)
  default     = []
}

variable "ami_id" {
  description = "Launch instance_count replicas from this AMI (edgemux installed as deploy/systemd describes, see README.md); null launches none."
  type        = string
  default     = null
}

variable "instance_count" {
  description = "How many replicas to launch from ami_id, spread over instance_subnet_ids."
  type        = number
  default     = 3

  validation {
    condition     = var.instance_count >= 1
    error_message = "instance_count: at least 1."
  }
}

variable "instance_type" {
  description = "EC2 instance type of the launched replicas (the AMI's architecture)."
  type        = string
  default     = "t3.medium"
}

variable "instance_subnet_ids" {
  description = "Private subnets for the launched replicas, one per availability zone; replica i goes to subnet i mod n."
  type        = list(string)
  default     = []
}

variable "etcd_endpoints" {
  description = "etcd client URLs (https://10.0.0.10:2379, ...) written into the launched replicas' [cluster] endpoints. A dedicated etcd, 3.4 or 3.5."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for e in var.etcd_endpoints : can(regex("^https?://", e))])
    error_message = "etcd_endpoints: http:// or https:// URLs."
  }
}

variable "etcd_ca_pem" {
  description = "PEM of the CA that signed etcd's server certificate; the launched replicas trust it (store_tls). null: the system's roots."
  type        = string
  default     = null
}

variable "etcd_security_group_id" {
  description = "etcd's security group; when given, it gains a rule admitting the instances on 2379."
  type        = string
  default     = null
}

variable "cluster_name" {
  description = "[cluster] name of the launched replicas: one DNS label, the same for every replica of the cluster."
  type        = string
  default     = "prod"

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.cluster_name))
    error_message = "cluster_name: one DNS label (a-z, 0-9, inner hyphens)."
  }
}

variable "peer_port" {
  description = "edgemux's peer port ([cluster.peer] bind), opened between the instances only."
  type        = number
  default     = 7443
}

variable "ssm_parameter_prefix" {
  description = "SSM Parameter Store path of the SecureStrings cluster-secret and ssh-host-key that launched replicas fetch at first boot."
  type        = string
  default     = "/edgemux/"

  validation {
    condition     = can(regex("^/(.*/)?$", var.ssm_parameter_prefix))
    error_message = "ssm_parameter_prefix: a path that starts and ends with /."
  }
}

variable "client_cidrs" {
  description = "IPv4 CIDRs that may connect to the NLB on 443 and 80."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "admin_port" {
  description = "edgemux's admin port (admin.bind): the NLB health-checks GET /readyz there; opened to the NLB and the VPC's CIDR (Prometheus) only."
  type        = number
  default     = 9090
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
