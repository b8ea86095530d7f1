variable "streammanager_package" {
  description = "pip requirement every instance installs streammanager from, e.g. 'streammanager==0.1.0'."
  type        = string
}

# -- AWS ---------------------------------------------------------------------------------------------------

variable "aws_cluster_name" {
  description = "Cluster id of the AWS deployment."
  type        = string
  default     = "sm-aws"
}

variable "aws_home_region" {
  description = "AWS region of the control plane (ZooKeeper, API servers, controllers) and of the first media nodes."
  type        = string
  default     = "us-east-1"
}

variable "aws_media_region" {
  description = "Second AWS region with media nodes, peered with the home VPC."
  type        = string
  default     = "eu-west-1"
}

variable "aws_api_certificate_arn" {
  description = "ACM certificate (in aws_home_region) for the API load balancer's HTTPS listener."
  type        = string
}

# -- GCE ---------------------------------------------------------------------------------------------------

variable "gce_project_id" {
  description = "GCP project of the GCE deployment."
  type        = string
}

variable "gce_cluster_name" {
  description = "Cluster id of the GCE deployment."
  type        = string
  default     = "sm-gce"
}

variable "gce_home_region" {
  description = "GCE region of the control plane and of the first media nodes."
  type        = string
  default     = "us-central1"
}

variable "gce_media_region" {
  description = "Second GCE region with media nodes (same VPC network, its own subnet)."
  type        = string
  default     = "europe-west1"
}

variable "gce_api_domains" {
  description = "DNS names of the GCE deployment's API (Google-managed certificate); point them at the gce_api_address output."
  type        = list(string)
}
