# streammanager on AWS, one media region: a VPC for the media nodes the controller launches here, peered
# with the home VPC so that agents reach ZooKeeper (and the controllers reach the agents) on private
# addresses. The control plane stays in the home region: one ZooKeeper ensemble serves every region.

data "aws_region" "current" {}

data "aws_region" "home" {
  provider = aws.home
}

# Standard zones in name order; the first availability_zone_count are used. No state filter: a zone
# that is impaired for a while must not shift the others and renumber the subnets.
data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:only the first availability_zone_count zones in name order are used, and AWS appends new zones at the end of that order
  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

data "aws_ami" "selected" {
  most_recent = true
  owners      = var.image_id == null ? ["136693071363"] : null

  filter {
    name   = var.image_id == null ? "name" : "image-id"
    values = [var.image_id == null ? "debian-12-amd64-*" : var.image_id]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

locals {
  name   = var.home.cluster_id
  region = data.aws_region.current.name
  azs    = slice(data.aws_availability_zones.available.names, 0, var.availability_zone_count)
  tags   = var.home.tags
  # the controller may launch only into subnets and security groups carrying this tag
  node_network_tag = { "sm-node-network" = var.home.cluster_id }
}

# -- region-wide EC2 defaults (see the aws module) -------------------------------------------------------

resource "aws_ebs_encryption_by_default" "this" {
  count   = var.set_region_ec2_defaults ? 1 : 0
  enabled = true
}

resource "aws_ec2_instance_metadata_defaults" "this" {
  count                       = var.set_region_ec2_defaults ? 1 : 0
  http_tokens                 = "required"
  http_put_response_hop_limit = 1
}

# -- network -----------------------------------------------------------------------------------------------

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = "${local.name}-media" })

  lifecycle {
    precondition {
      condition     = data.aws_region.home.name != data.aws_region.current.name
      error_message = "a media-region module must run in another region than the home one (the aws module covers the home region's media nodes)."
    }
  }
}

resource "aws_default_security_group" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.name}-media-default-unused" })
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.name}-media" })
}

resource "aws_subnet" "media" {
  count                   = var.availability_zone_count
  vpc_id                  = aws_vpc.this.id
  cidr_block              = cidrsubnet(var.vpc_cidr, 2, count.index)
  availability_zone       = local.azs[count.index]
  map_public_ip_on_launch = false # the controller asks for a public address per media node
  tags = merge(local.tags, local.node_network_tag, {
    Name = "${local.name}-media-${local.azs[count.index]}"
    tier = "public"
  })
}

resource "aws_route_table" "media" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.name}-media" })
}

resource "aws_route" "internet" {
  route_table_id         = aws_route_table.media.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this.id
}

resource "aws_route_table_association" "media" {
  count          = var.availability_zone_count
  subnet_id      = aws_subnet.media[count.index].id
  route_table_id = aws_route_table.media.id
}

# -- peering with the home VPC -------------------------------------------------------------------------

resource "aws_vpc_peering_connection" "home" {
  vpc_id      = aws_vpc.this.id
  peer_vpc_id = var.home.vpc_id
  peer_region = var.home.region
  auto_accept = false
  tags        = merge(local.tags, { Name = "${local.name}-${local.region}-to-home" })
}

resource "aws_vpc_peering_connection_accepter" "home" {
  provider                  = aws.home
  vpc_peering_connection_id = aws_vpc_peering_connection.home.id
  auto_accept               = true
  tags                      = merge(local.tags, { Name = "${local.name}-${local.region}-to-home" })
}

resource "aws_route" "to_home" {
  route_table_id            = aws_route_table.media.id
  destination_cidr_block    = var.home.vpc_cidr
  vpc_peering_connection_id = aws_vpc_peering_connection.home.id

  depends_on = [aws_vpc_peering_connection_accepter.home]
}

resource "aws_route" "from_home" {
  provider                  = aws.home
  count                     = length(var.home.route_table_ids)
  route_table_id            = var.home.route_table_ids[count.index]
  destination_cidr_block    = var.vpc_cidr
  vpc_peering_connection_id = aws_vpc_peering_connection.home.id

  depends_on = [aws_vpc_peering_connection_accepter.home]
}

# Agents of this region are ZooKeeper clients. Security groups cannot be referenced across an
# inter-region peering, so the home ensemble admits this VPC's private CIDR (never the internet).
resource "aws_vpc_security_group_ingress_rule" "zookeeper_from_media" {
  provider          = aws.home
  security_group_id = var.home.zookeeper_security_group_id
  description       = "ZooKeeper clients: media nodes in ${local.region}"
  ip_protocol       = "tcp"
  from_port         = 2181
  to_port           = 2181
  cidr_ipv4         = var.vpc_cidr
}

# -- media node security group -------------------------------------------------------------------------

resource "aws_security_group" "media" {
  #checkov:skip=CKV2_AWS_5:attached at run time: the controller launches media nodes with this group through libcloud
  name        = "${local.name}-media"
  description = "streammanager ${local.name}: media nodes launched by the controller in ${local.region}"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, local.node_network_tag, { Name = "${local.name}-media" })
}

resource "aws_vpc_security_group_ingress_rule" "rtmp" {
  for_each          = toset(var.rtmp_ingress_cidrs)
  security_group_id = aws_security_group.media.id
  description       = "RTMP publish and play"
  ip_protocol       = "tcp"
  from_port         = var.home.rtmp_port
  to_port           = var.home.rtmp_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "agent_from_home" {
  security_group_id = aws_security_group.media.id
  description       = "node agent HTTP from the home VPC (API servers, controllers, nodes)"
  ip_protocol       = "tcp"
  from_port         = var.home.agent_http_port
  to_port           = var.home.agent_http_port
  cidr_ipv4         = var.home.vpc_cidr
}

resource "aws_vpc_security_group_ingress_rule" "agent_from_media" {
  security_group_id            = aws_security_group.media.id
  description                  = "node agent HTTP from this region's nodes"
  ip_protocol                  = "tcp"
  from_port                    = var.home.agent_http_port
  to_port                      = var.home.agent_http_port
  referenced_security_group_id = aws_security_group.media.id
}

resource "aws_vpc_security_group_egress_rule" "web" {
  for_each          = toset(["80", "443"])
  security_group_id = aws_security_group.media.id
  description       = "packages"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value)
  to_port           = tonumber(each.value)
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "private" {
  for_each          = toset(["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"])
  security_group_id = aws_security_group.media.id
  description       = "cluster traffic: ZooKeeper, agents, origins"
  ip_protocol       = "-1"
  cidr_ipv4         = each.value
}

# -- flow logs, written with the home module's role ----------------------------------------------------

module "logs_key" {
  source       = "../log-key"
  cluster_name = local.name
  description  = "streammanager ${local.name}: flow logs in ${local.region}"
  tags         = local.tags
}

moved {
  from = aws_kms_key.logs
  to   = module.logs_key.aws_kms_key.this
}

resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/streammanager/${local.name}/vpc-flow-logs/${local.region}"
  retention_in_days = var.log_retention_days
  kms_key_id        = module.logs_key.arn
  tags              = local.tags
}

resource "aws_flow_log" "this" {
  vpc_id                   = aws_vpc.this.id
  traffic_type             = "ALL"
  log_destination_type     = "cloud-watch-logs"
  log_destination          = aws_cloudwatch_log_group.flow_logs.arn
  iam_role_arn             = var.home.flow_logs_role_arn
  max_aggregation_interval = 600
  tags                     = local.tags
}
