# A customer-managed KMS key, with rotation, for the cluster's log groups in one region: the account
# administers it through IAM (AWS's default key policy), and CloudWatch Logs in this region may use it for
# the log groups under /streammanager/<cluster_name>/. The aws module's key also encrypts the secrets of the
# admin token and of the ZooKeeper identity (their readers are granted kms:Decrypt by IAM); each media
# region has one for its flow logs.

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  region     = data.aws_region.current.name
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
}

data "aws_iam_policy_document" "kms_key" {
  #checkov:skip=CKV_AWS_109:a key policy: "*" is this key, and the account root statement delegates its use to IAM policies (AWS's default key policy)
  #checkov:skip=CKV_AWS_111:a key policy: "*" is this key, and the account root statement delegates its use to IAM policies (AWS's default key policy)
  #checkov:skip=CKV_AWS_356:a key policy: "*" is this key, and the account root statement delegates its use to IAM policies (AWS's default key policy)
  statement {
    sid       = "AccountAdministersKeyThroughIam"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy, "*" is this key
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "CloudWatchLogsEncryptsTheClusterLogGroups"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:/streammanager/${var.cluster_name}/*"]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = var.description
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_key.json
  tags                    = var.tags
}
