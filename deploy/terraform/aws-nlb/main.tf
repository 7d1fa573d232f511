# An internet-facing Network Load Balancer in front of edgemux: plain TCP passthrough on 443 and
# 80 (edgemux terminates TLS itself: it needs the ClientHello's SNI and ALPN), with a PROXY
# protocol v2 header on every connection so that edgemux sees the real client address. Its
# targets are the instances you run yourself (instance_ids) and instance_count replicas launched
# from ami_id, which find each other through etcd and talk over the peer port, open only between
# the instances.

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

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

locals {
  # Traffic ports: the NLB listens on these and edgemux listens on the same on the instances.
  ports = {
    https = 443
    http  = 80
  }

  # Replicas launched here; none without an AMI.
  launched = var.ami_id == null ? 0 : var.instance_count
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
  # SSH tunnels are long-lived; give a deregistered instance time to drain (edgemux drains 30 s,
  # limits.drain_timeout): keep this above the drain timeout.
  deregistration_delay = 60

  # Readiness, not just an open port: GET /readyz on the admin listener turns 503 as soon as a
  # stopping edgemux starts to drain, so the NLB sends it no new connection within about 10 s
  # (2 failed checks, 5 s apart) while it finishes what it has.
  health_check {
    protocol            = "HTTP"
    port                = tostring(var.admin_port)
    path                = "/readyz"
    matcher             = "200"
    interval            = 5
    timeout             = 3
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  # By default the NLB resets every connection of a target that fails its health check, which
  # would cut the requests and tunnels a draining edgemux is finishing. Instead the target goes
  # unhealthy.draining: no new connections, established ones kept for this long (above the
  # drain timeout).
  target_health_state {
    enable_unhealthy_connection_termination = false
    unhealthy_draining_interval             = 60
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

resource "aws_lb_target_group_attachment" "replica" {
  for_each = {
    for pair in setproduct(keys(local.ports), range(local.launched)) :
    "${pair[0]}-${pair[1]}" => { tg = pair[0], index = pair[1] }
  }

  target_group_arn = aws_lb_target_group.this[each.value.tg].arn
  target_id        = aws_instance.replica[each.value.index].id
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
  for_each = merge(local.ports, { admin = var.admin_port })

  security_group_id            = aws_security_group.nlb.id
  description                  = "to edgemux ${each.value} (${each.key == "admin" ? "health checks" : "traffic"})"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.instances.id
}

# The instances' security group: 443 and 80 only from the NLB (which carries the internet's
# traffic), so the NLB is the only path to edgemux; the admin port from the NLB (health checks)
# and the VPC (Prometheus); the peer port only from the instances themselves.
resource "aws_security_group" "instances" {
  name        = "${var.name}-instances"
  description = "edgemux instances: 443 and 80 from the NLB, admin from the NLB and the VPC, peer from each other"
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

resource "aws_vpc_security_group_ingress_rule" "admin_from_nlb" {
  security_group_id            = aws_security_group.instances.id
  description                  = "edgemux /readyz health checks from the NLB"
  ip_protocol                  = "tcp"
  from_port                    = var.admin_port
  to_port                      = var.admin_port
  referenced_security_group_id = aws_security_group.nlb.id
}

# The peer link between replicas ([cluster.peer] bind): from members of this same group only.
# Never from the NLB or the internet: the NLB has no listener or egress rule for it either.
resource "aws_vpc_security_group_ingress_rule" "peer" {
  security_group_id            = aws_security_group.instances.id
  description                  = "edgemux peer link, between the instances only"
  ip_protocol                  = "tcp"
  from_port                    = var.peer_port
  to_port                      = var.peer_port
  referenced_security_group_id = aws_security_group.instances.id
}

# etcd's clients are the instances: admit them on etcd's group, when it is given.
resource "aws_vpc_security_group_ingress_rule" "etcd" {
  count = var.etcd_security_group_id == null ? 0 : 1

  security_group_id            = var.etcd_security_group_id
  description                  = "etcd client port from the edgemux instances"
  ip_protocol                  = "tcp"
  from_port                    = 2379
  to_port                      = 2379
  referenced_security_group_id = aws_security_group.instances.id
}

# Outbound: etcd, the other replicas' peer port, ACME (Let's Encrypt) over HTTPS, DNS, and
# everything else the instance needs.
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

# Replicas launched from ami_id: an image with edgemux installed as deploy/systemd/README.md
# describes (see README.md here). At first boot replica-boot.sh.tftpl fetches the two files
# every replica shares from SSM Parameter Store, adds this instance's [cluster] section and
# starts edgemux.
resource "aws_instance" "replica" {
  count = local.launched

  ami                    = var.ami_id
  instance_type          = var.instance_type
  subnet_id              = var.instance_subnet_ids[count.index % length(var.instance_subnet_ids)]
  vpc_security_group_ids = [aws_security_group.instances.id]
  iam_instance_profile   = aws_iam_instance_profile.replica[0].name

  user_data = templatefile("${path.module}/replica-boot.sh.tftpl", {
    ssm_parameter_prefix = var.ssm_parameter_prefix
    etcd_ca_pem          = var.etcd_ca_pem == null ? "" : var.etcd_ca_pem
    cluster_dropin       = file("${path.module}/../../systemd/edgemux.service.d/cluster.conf")
    cluster_toml = templatefile("${path.module}/cluster.toml.tftpl", {
      cluster_name = var.cluster_name
      endpoints    = jsonencode(var.etcd_endpoints)
      store_tls    = var.etcd_ca_pem == null ? "" : "store_tls = { ca = \"/etc/edgemux/etcd-ca.pem\" }"
      peer_port    = var.peer_port
    })
  })
  user_data_replace_on_change = true

  metadata_options {
    http_tokens = "required"
  }

  tags = merge(var.tags, { Name = "${var.name}-${count.index}" })

  lifecycle {
    precondition {
      condition     = length(var.etcd_endpoints) > 0 && length(var.instance_subnet_ids) > 0
      error_message = "Launched replicas need etcd_endpoints and instance_subnet_ids."
    }
  }
}

# What a launched replica may do with its role: read the shared files under ssm_parameter_prefix.
resource "aws_iam_role" "replica" {
  count = local.launched > 0 ? 1 : 0

  name = "${var.name}-replica"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = var.tags
}

resource "aws_iam_role_policy" "replica" {
  count = local.launched > 0 ? 1 : 0

  name = "read-edgemux-parameters"
  role = aws_iam_role.replica[0].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = "ssm:GetParameter"
      Resource = "arn:${data.aws_partition.current.partition}:ssm:*:${data.aws_caller_identity.current.account_id}:parameter${var.ssm_parameter_prefix}*"
    }]
  })
}

resource "aws_iam_instance_profile" "replica" {
  count = local.launched > 0 ? 1 : 0

  name = "${var.name}-replica"
  role = aws_iam_role.replica[0].name
  tags = var.tags
}
