# streammanager on AWS, home region: the VPC, a ZooKeeper ensemble, API servers behind an ALB, the
# controllers, and the network, role and boot script the controller launches media nodes with.
# Media nodes in other regions use the media-region submodule (./media-region), peered with this VPC.
#
# Tagging rule: everything here carries "streammanager-cluster" = var.name. The controller's own tag
# "sm-cluster" is reserved for the media nodes it launches: it lists, and may only terminate, instances
# carrying it, so no instance created here (ZooKeeper, API, controllers) may ever carry it.

data "aws_region" "current" {}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# Standard zones in name order; the first availability_zone_count are used. No state filter: a zone
# that is impaired for a while must not shift the others and renumber the subnets.
data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:only the first availability_zone_count zones in name order are used, and AWS appends new zones at the end of that order
  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

# The image of every instance here and of the media nodes: var.image_id, or the latest Debian 12.
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
  region     = data.aws_region.current.name
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  azs          = slice(data.aws_availability_zones.available.names, 0, var.availability_zone_count)
  public_cidrs = [for i in range(var.availability_zone_count) : cidrsubnet(var.vpc_cidr, 4, i)]
  # private subnets start half-way through the VPC so that public ones can be added without renumbering
  private_cidrs = [for i in range(var.availability_zone_count) : cidrsubnet(var.vpc_cidr, 4, i + 8)]

  # ZooKeeper members get fixed private addresses (.10, .11 ... of the private subnets, round robin over
  # the zones) so that the connection string is known at plan time and survives a member's replacement.
  zookeeper_ips = [
    for i in range(var.zookeeper_count) :
    cidrhost(local.private_cidrs[i % var.availability_zone_count], 10 + floor(i / var.availability_zone_count))
  ]
  zk_hosts = join(",", [for ip in local.zookeeper_ips : "${ip}:2181"])

  # Regions the controller may act in (an IAM condition).
  node_regions = distinct(concat([local.region], var.media_regions))

  image_id         = data.aws_ami.selected.id
  root_device_name = data.aws_ami.selected.root_device_name

  tags = merge(var.tags, { "streammanager-cluster" = var.name })
  # Put on the subnets and the security group media nodes may be launched with: the controller's
  # RunInstances is allowed only into resources carrying it.
  node_network_tag = { "sm-node-network" = var.name }

  # Boot script the controller renders for each media node (see templates/node-boot.sh.tftpl).
  node_boot_script_template = templatefile("${path.module}/templates/node-boot.sh.tftpl", {
    agent_http_port = var.agent_http_port
    rtmp_port       = var.rtmp_port
  })

  install_streammanager = templatefile("${path.module}/templates/install.sh.tftpl", {
    package_spec = var.package_spec
  })
}

# -- region-wide EC2 defaults --------------------------------------------------------------------------
# libcloud's create_node can neither ask for IMDSv2 nor encrypt the root volume, so the region enforces both.

resource "aws_ebs_encryption_by_default" "this" {
  count   = var.set_region_ec2_defaults ? 1 : 0
  enabled = true
}

resource "aws_ec2_instance_metadata_defaults" "this" {
  count                       = var.set_region_ec2_defaults ? 1 : 0
  http_tokens                 = "required"
  http_put_response_hop_limit = 1
}

# -- encryption key of the cluster's secret and logs -----------------------------------------------------

module "cluster_key" {
  source       = "./log-key"
  cluster_name = var.name
  description  = "streammanager ${var.name}: admin token and ZooKeeper identity secrets, log groups"
  tags         = local.tags
}

moved {
  from = aws_kms_key.cluster
  to   = module.cluster_key.aws_kms_key.this
}

resource "aws_kms_alias" "cluster" {
  name          = "alias/streammanager-${var.name}"
  target_key_id = module.cluster_key.key_id
}

# -- the admin token (SM_ACCESS_TOKEN) -----------------------------------------------------------------
# Generated here, so it is also in the Terraform state: keep the state encrypted and access-controlled.
# API servers read it from Secrets Manager each time they start; operators read it the same way.

resource "random_password" "access_token" {
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret" "access_token" {
  #checkov:skip=CKV2_AWS_57:the admin token is rotated by the operator (put a new value, restart the API servers); there is no rotation Lambda for it
  name                    = "streammanager/${var.name}/access-token"
  description             = "SM_ACCESS_TOKEN, the admin API token of streammanager cluster ${var.name}"
  kms_key_id              = module.cluster_key.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "access_token" {
  secret_id     = aws_secretsmanager_secret.access_token.id
  secret_string = random_password.access_token.result
}

# -- the cluster's ZooKeeper identity (SM_ZK_AUTH) -----------------------------------------------------
# One digest identity per cluster, "streammanager:<password>": every znode the cluster creates gets an ACL
# for it alone. The password has letters and digits only, so nothing splits USER:PASSWORD at a second ":"
# and nothing needs quoting in a shell, a systemd unit or the nodes' boot script. Generated here, so it is
# also in the Terraform state. API servers and controllers read it from Secrets Manager each time they
# start; the controller hands it to the media nodes it launches (the boot script's zk_auth placeholder),
# so the node role cannot read it. Operators read it the same way, for their own ZooKeeper clients.

resource "random_password" "zk_auth" {
  length  = 32
  special = false
}

resource "aws_secretsmanager_secret" "zk_auth" {
  #checkov:skip=CKV2_AWS_57:a new ZooKeeper password is refused on the znodes the old one created (their ACLs name its digest): rotating it means re-ACLing or recreating the registry, never a Lambda
  name                    = "streammanager/${var.name}/zk-auth"
  description             = "SM_ZK_AUTH, the ZooKeeper digest identity (USER:PASSWORD) of streammanager cluster ${var.name}"
  kms_key_id              = module.cluster_key.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "zk_auth" {
  secret_id     = aws_secretsmanager_secret.zk_auth.id
  secret_string = "streammanager:${random_password.zk_auth.result}"
}
