# Who may talk to whom. ZooKeeper (2181 clients, 2888/3888 quorum) is reachable only from the cluster's
# own security groups (and, through media-region modules, from the peered media VPCs' private CIDRs).
# RTMP is the only port open to the world, and only on media nodes.

resource "aws_security_group" "alb" {
  name        = "${var.name}-api-alb"
  description = "streammanager ${var.name}: API load balancer"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-api-alb" })
}

resource "aws_security_group" "api" {
  name        = "${var.name}-api"
  description = "streammanager ${var.name}: API servers"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-api" })
}

resource "aws_security_group" "controller" {
  name        = "${var.name}-controller"
  description = "streammanager ${var.name}: controllers"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-controller" })
}

resource "aws_security_group" "zookeeper" {
  name        = "${var.name}-zookeeper"
  description = "streammanager ${var.name}: ZooKeeper ensemble"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-zookeeper" })
}

resource "aws_security_group" "media" {
  #checkov:skip=CKV2_AWS_5:attached at run time: the controller launches media nodes with this group through libcloud
  name        = "${var.name}-media"
  description = "streammanager ${var.name}: media nodes launched by the controller"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, local.node_network_tag, { Name = "${var.name}-media" })
}

locals {
  instance_security_groups = {
    api        = aws_security_group.api.id
    controller = aws_security_group.controller.id
    zookeeper  = aws_security_group.zookeeper.id
    media      = aws_security_group.media.id
  }
  # everything that is a ZooKeeper client in this region
  zookeeper_clients = {
    api        = aws_security_group.api.id
    controller = aws_security_group.controller.id
    media      = aws_security_group.media.id
  }
  private_ranges = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
}

# -- load balancer -----------------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each          = toset(var.api_ingress_cidrs)
  security_group_id = aws_security_group.alb.id
  description       = "HTTPS to the API"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "alb_to_api" {
  security_group_id            = aws_security_group.alb.id
  description                  = "to the API servers"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.api.id
}

resource "aws_vpc_security_group_ingress_rule" "api_from_alb" {
  security_group_id            = aws_security_group.api.id
  description                  = "API traffic and health checks from the load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.alb.id
}

# -- ZooKeeper ---------------------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "zookeeper_clients" {
  for_each                     = local.zookeeper_clients
  security_group_id            = aws_security_group.zookeeper.id
  description                  = "ZooKeeper clients: ${each.key}"
  ip_protocol                  = "tcp"
  from_port                    = 2181
  to_port                      = 2181
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_ingress_rule" "zookeeper_quorum" {
  for_each                     = toset(["2888", "3888"])
  security_group_id            = aws_security_group.zookeeper.id
  description                  = "ZooKeeper quorum and leader election between members"
  ip_protocol                  = "tcp"
  from_port                    = tonumber(each.value)
  to_port                      = tonumber(each.value)
  referenced_security_group_id = aws_security_group.zookeeper.id
}

# -- media nodes -------------------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "media_rtmp" {
  for_each          = toset(var.rtmp_ingress_cidrs)
  security_group_id = aws_security_group.media.id
  description       = "RTMP publish and play"
  ip_protocol       = "tcp"
  from_port         = var.rtmp_port
  to_port           = var.rtmp_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "media_agent" {
  for_each                     = local.zookeeper_clients
  security_group_id            = aws_security_group.media.id
  description                  = "node agent HTTP from the cluster: ${each.key}"
  ip_protocol                  = "tcp"
  from_port                    = var.agent_http_port
  to_port                      = var.agent_http_port
  referenced_security_group_id = each.value
}

# -- egress of every instance: the web (packages, AWS APIs) and private address space (cluster, peers) ---

resource "aws_vpc_security_group_egress_rule" "web" {
  for_each = {
    for pair in setproduct(keys(local.instance_security_groups), [80, 443]) :
    "${pair[0]}-${pair[1]}" => { group = pair[0], port = pair[1] }
  }
  security_group_id = local.instance_security_groups[each.value.group]
  description       = "packages and cloud APIs"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "private" {
  for_each = {
    for pair in setproduct(keys(local.instance_security_groups), local.private_ranges) :
    "${pair[0]}-${pair[1]}" => { group = pair[0], cidr = pair[1] }
  }
  security_group_id = local.instance_security_groups[each.value.group]
  description       = "cluster traffic, also to peered media regions"
  ip_protocol       = "-1"
  cidr_ipv4         = each.value.cidr
}
