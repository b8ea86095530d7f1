# Roles. The controller's role allows exactly the EC2 calls libcloud makes for it (RunInstances with tags,
# DescribeInstances, TerminateInstances, CreateTags) plus handing the node role to new instances, each
# limited by the sm-cluster tag and the cluster's regions wherever IAM supports a condition.
# The API servers' role reads the admin token; the API servers' and the controllers' roles read the
# cluster's ZooKeeper identity.

locals {
  ec2_arn_prefix = "arn:${local.partition}:ec2:*:${local.account_id}"
  # the tag keys libcloud writes at launch: Name plus the controller's four
  launch_tag_keys = ["Name", "sm-cluster", "sm-group", "sm-region", "sm-role"]
}

data "aws_iam_policy_document" "ec2_assume_role" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# -- controller --------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "controller" {
  statement {
    sid       = "ListInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"] # Describe calls support no resource-level permissions
    condition {
      test     = "StringEquals"
      variable = "aws:RequestedRegion"
      values   = local.node_regions
    }
  }

  statement {
    sid       = "LaunchOnlyInstancesTaggedWithThisCluster"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn_prefix}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/sm-cluster"
      values   = [var.name]
    }
    condition {
      test     = "ForAllValues:StringEquals"
      variable = "aws:TagKeys"
      values   = local.launch_tag_keys
    }
    condition {
      test     = "StringEquals"
      variable = "aws:RequestedRegion"
      values   = local.node_regions
    }
  }

  statement {
    sid     = "LaunchOnlyIntoTheClusterNodeNetworks"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn_prefix}:subnet/*",
      "${local.ec2_arn_prefix}:security-group/*",
    ]
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/sm-node-network"
      values   = [var.name]
    }
  }

  statement {
    sid     = "LaunchWithNewVolumesAndInterfaces"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn_prefix}:volume/*",
      "${local.ec2_arn_prefix}:network-interface/*",
    ]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestedRegion"
      values   = local.node_regions
    }
  }

  statement {
    sid       = "LaunchFromApprovedImages"
    actions   = ["ec2:RunInstances"]
    resources = ["arn:${local.partition}:ec2:*::image/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:Owner"
      values   = var.node_image_owners
    }
  }

  statement {
    sid       = "TagInstancesOnlyWhileLaunchingThem"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn_prefix}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "RetagOwnInstancesButNeverTheirCluster"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn_prefix}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/sm-cluster"
      values   = [var.name]
    }
    condition {
      test     = "Null"
      variable = "aws:RequestTag/sm-cluster"
      values   = ["true"]
    }
  }

  statement {
    sid       = "TerminateOnlyOwnInstances"
    actions   = ["ec2:TerminateInstances"]
    resources = ["${local.ec2_arn_prefix}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/sm-cluster"
      values   = [var.name]
    }
  }

  statement {
    sid       = "GiveNewInstancesTheNodeRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.node.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "controller" {
  name               = "${var.name}-controller"
  description        = "streammanager ${var.name} controller: launches, lists and terminates its media nodes, reads the ZooKeeper identity"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume_role.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "controller" {
  name   = "launch-media-nodes"
  role   = aws_iam_role.controller.id
  policy = data.aws_iam_policy_document.controller.json
}

resource "aws_iam_instance_profile" "controller" {
  name = "${var.name}-controller"
  role = aws_iam_role.controller.name
  tags = local.tags
}

# -- API servers: read the admin token -------------------------------------------------------------------

data "aws_iam_policy_document" "api" {
  statement {
    sid       = "ReadTheAdminToken"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.access_token.arn]
  }

  statement {
    sid       = "DecryptTheAdminTokenThroughSecretsManager"
    actions   = ["kms:Decrypt"]
    resources = [module.cluster_key.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "api" {
  name               = "${var.name}-api"
  description        = "streammanager ${var.name} API servers: read the admin token and the ZooKeeper identity"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume_role.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "api" {
  name   = "read-access-token"
  role   = aws_iam_role.api.id
  policy = data.aws_iam_policy_document.api.json
}

resource "aws_iam_instance_profile" "api" {
  name = "${var.name}-api"
  role = aws_iam_role.api.name
  tags = local.tags
}

# -- API servers and controllers: read the cluster's ZooKeeper identity ----------------------------------
# Both authenticate to ZooKeeper as the cluster (SM_ZK_AUTH): one document, attached to these two roles
# only. Media nodes get the identity from the controller through their boot script, so the node role has
# no access to the secret.

data "aws_iam_policy_document" "zk_auth" {
  statement {
    sid       = "ReadTheZooKeeperIdentity"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.zk_auth.arn]
  }

  statement {
    sid       = "DecryptTheZooKeeperIdentityThroughSecretsManager"
    actions   = ["kms:Decrypt"]
    resources = [module.cluster_key.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "zk_auth" {
  for_each = {
    api        = aws_iam_role.api.id
    controller = aws_iam_role.controller.id
  }
  name   = "read-zookeeper-identity"
  role   = each.value
  policy = data.aws_iam_policy_document.zk_auth.json
}

# -- ZooKeeper members and media nodes: no AWS permissions (only Session Manager when enabled) ----------

resource "aws_iam_role" "zookeeper" {
  name               = "${var.name}-zookeeper"
  description        = "streammanager ${var.name} ZooKeeper members: no AWS permissions of their own"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume_role.json
  tags               = local.tags
}

resource "aws_iam_instance_profile" "zookeeper" {
  name = "${var.name}-zookeeper"
  role = aws_iam_role.zookeeper.name
  tags = local.tags
}

resource "aws_iam_role" "node" {
  name               = "${var.name}-node"
  description        = "streammanager ${var.name} media nodes: no AWS permissions of their own"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume_role.json
  tags               = local.tags
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-node"
  role = aws_iam_role.node.name
  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "ssm" {
  for_each = var.enable_ssm ? {
    api        = aws_iam_role.api.name
    controller = aws_iam_role.controller.name
    zookeeper  = aws_iam_role.zookeeper.name
    node       = aws_iam_role.node.name
  } : {}
  role       = each.value
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# -- VPC flow logs (shared with the media regions' flow logs: IAM is global) -------------------------------

data "aws_iam_policy_document" "flow_logs_assume_role" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    sid = "WriteTheClusterFlowLogs"
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogGroups",
      "logs:DescribeLogStreams",
    ]
    resources = [
      "arn:${local.partition}:logs:*:${local.account_id}:log-group:/streammanager/${var.name}/vpc-flow-logs/*",
      "arn:${local.partition}:logs:*:${local.account_id}:log-group:/streammanager/${var.name}/vpc-flow-logs/*:*",
    ]
  }
}

resource "aws_iam_role" "flow_logs" {
  name               = "${var.name}-flow-logs"
  description        = "streammanager ${var.name}: VPC flow logs delivery"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume_role.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs.json
}
