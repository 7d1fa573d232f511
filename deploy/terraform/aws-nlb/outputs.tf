output "nlb_dns_name" {
  description = "The NLB's DNS name: point the apex and the wildcard record (*.domain) at it."
  value       = aws_lb.this.dns_name
}

output "nlb_zone_id" {
  description = "The NLB's Route 53 hosted zone id, for alias records."
  value       = aws_lb.this.zone_id
}

output "nlb_arn" {
  description = "The NLB's ARN."
  value       = aws_lb.this.arn
}

output "nlb_subnet_cidrs" {
  description = "CIDRs of the NLB's subnets: paste them into trusted_proxies on every edgemux listener."
  value       = sort([for s in data.aws_subnet.nlb : s.cidr_block])
}

output "target_group_arns" {
  description = "Target group ARNs by port name (https, http), e.g. to register more instances."
  value       = { for k, tg in aws_lb_target_group.this : k => tg.arn }
}

output "instance_security_group_id" {
  description = "The security group attached to the instances (443 and 80 from the NLB, admin from the NLB and the VPC, the peer port from each other)."
  value       = aws_security_group.instances.id
}

output "replica_instance_ids" {
  description = "The launched replicas' instance ids, which are also their replica_name."
  value       = aws_instance.replica[*].id
}

output "replica_private_ips" {
  description = "The launched replicas' private addresses: their peer addresses, and the etcd clients to admit."
  value       = aws_instance.replica[*].private_ip
}
