variable "cluster_name" {
  description = "The cluster's name: CloudWatch Logs may use the key for the log groups under /streammanager/<cluster_name>/."
  type        = string
}

variable "description" {
  description = "What the key protects, shown in the KMS console."
  type        = string
}

variable "tags" {
  description = "Tags of the key."
  type        = map(string)
  default     = {}
}
