# An internet-facing Network Load Balancer in front of edgemux: plain TCP passthrough on 443 and
# 80 (edgemux terminates TLS itself: it needs the ClientHello's SNI and ALPN), with a PROXY
# protocol v2 header on every connection so that edgemux sees the real client address.

data "aws_vpc" "this" {
  id = var.vpc_id
}

# The NLB connects to targets from private addresses inside these subnets: their CIDRs are
# exactly what edgemux's trusted_proxies must list.
data "aws_subnet" "nlb" {
  for_each = toset(var.subnet_ids)
  id       = each.value
}

data "aws_instance" "target" {
  for_each    = toset(var.instance_ids)
  instance_id = each.value
}

locals {
  # Traffic ports: the NLB listens on these and edgemux listens on the same on the instances.
  ports = {
    https = 443
    http  = 80
  }
}

resource "aws_lb" "this" {
  name                             = var.name
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = var.subnet_ids
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true
  tags                             = var.tags
}

resource "aws_lb_target_group" "this" {
  for_each = local.ports

  name        = "${var.name}-${each.key}"
  port        = each.value
  protocol    = "TCP"
  target_type = "instance"
  vpc_id      = var.vpc_id

  # The header edgemux reads (listener proxy_protocol = "required").
  proxy_protocol_v2 = true
  # On by default for instance targets: the NLB would then connect with the client's own address,
  # edgemux would see the client as the peer and refuse its header as untrusted.
  preserve_client_ip = false
  # SSH tunnels are long-lived; give a deregistered instance time to drain (edgemux drains 30 s).
  deregistration_delay = 60

  health_check {
    protocol            = "TCP"
    port                = "traffic-port"
    interval            = 10
    healthy_threshold   = 3
    unhealthy_threshold = 3
  }

  tags = var.tags
}

resource "aws_lb_listener" "this" {
  for_each = local.ports

  load_balancer_arn = aws_lb.this.arn
  port              = each.value
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this[each.key].arn
  }

  tags = var.tags
}

resource "aws_lb_target_group_attachment" "this" {
  for_each = {
    for pair in setproduct(keys(local.ports), var.instance_ids) :
    "${pair[0]}-${pair[1]}" => { tg = pair[0], instance = pair[1] }
  }

  target_group_arn = aws_lb_target_group.this[each.value.tg].arn
  target_id        = each.value.instance
  port             = local.ports[each.value.tg]
}

# The NLB's own security group: 443 and 80 from the internet (client_cidrs).
resource "aws_security_group" "nlb" {
  name        = "${var.name}-nlb"
  description = "edgemux NLB: 443 and 80 from clients"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "nlb" {
  for_each = {
    for pair in setproduct(keys(local.ports), var.client_cidrs) :
    "${pair[0]}-${pair[1]}" => { port = local.ports[pair[0]], cidr = pair[1] }
  }

  security_group_id = aws_security_group.nlb.id
  description       = "edgemux ${each.value.port} from clients"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "nlb" {
  for_each = local.ports

  security_group_id            = aws_security_group.nlb.id
  description                  = "to edgemux ${each.value} (traffic and health checks)"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.instances.id
}

# The instances' security group: 443 and 80 only from the NLB (which carries the internet's
# traffic), so the NLB is the only path to edgemux; the admin port only from inside the VPC.
resource "aws_security_group" "instances" {
  name        = "${var.name}-instances"
  description = "edgemux instances: 443 and 80 from the NLB, admin from the VPC"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "from_nlb" {
  for_each = local.ports

  security_group_id            = aws_security_group.instances.id
  description                  = "edgemux ${each.value} from the NLB"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.nlb.id
}

resource "aws_vpc_security_group_ingress_rule" "admin" {
  security_group_id = aws_security_group.instances.id
  description       = "edgemux admin (metrics, probes) from the VPC"
  ip_protocol       = "tcp"
  from_port         = var.admin_port
  to_port           = var.admin_port
  cidr_ipv4         = data.aws_vpc.this.cidr_block
}

# Outbound: ACME (Let's Encrypt) over HTTPS, DNS, and everything else the instance needs.
resource "aws_vpc_security_group_egress_rule" "instances" {
  security_group_id = aws_security_group.instances.id
  description       = "all outbound"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

# Adds the group to each instance's primary network interface, next to the groups it already has.
resource "aws_network_interface_sg_attachment" "instances" {
  for_each = data.aws_instance.target

  security_group_id    = aws_security_group.instances.id
  network_interface_id = each.value.network_interface_id
}
