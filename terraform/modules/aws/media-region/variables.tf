variable "home" {
  description = "The home region's `home` output of the aws module: cluster id, VPC, route tables, ZooKeeper security group, node profile, ports and tags."
  type = object({
    cluster_id                  = string
    region                      = string
    vpc_id                      = string
    vpc_cidr                    = string
    route_table_ids             = list(string)
    zookeeper_security_group_id = string
    node_instance_profile       = string
    flow_logs_role_arn          = string
    agent_http_port             = number
    rtmp_port                   = number
    tags                        = map(string)
  })

  validation {
    condition     = alltrue([for port in [var.home.rtmp_port, var.home.agent_http_port] : !contains([2181, 2888, 3888], port)])
    error_message = "home.rtmp_port and home.agent_http_port must not be ZooKeeper's ports (2181, 2888, 3888)."
  }

  validation {
    condition     = can(regex("^(10\\.|172\\.(1[6-9]|2[0-9]|3[01])\\.|192\\.168\\.)", var.home.vpc_cidr))
    error_message = "home.vpc_cidr must be a private (RFC 1918) CIDR: this region's agents admit it on their HTTP port."
  }
}

variable "vpc_cidr" {
  description = "Private (RFC 1918) CIDR of this region's media VPC, /16 to /22; must not overlap the home VPC or other media regions. ZooKeeper admits it on port 2181 through the peering."
  type        = string

  validation {
    condition = (
      can(cidrnetmask(var.vpc_cidr)) &&
      tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 22 &&
      can(regex("^(10\\.|172\\.(1[6-9]|2[0-9]|3[01])\\.|192\\.168\\.)", var.vpc_cidr))
    )
    error_message = "vpc_cidr must be a private (RFC 1918) CIDR between /16 and /22."
  }
}

variable "availability_zone_count" {
  description = "How many availability zones the media subnets span."
  type        = number
  default     = 2

  validation {
    condition     = var.availability_zone_count >= 1 && var.availability_zone_count <= 6
    error_message = "availability_zone_count must be between 1 and 6."
  }
}

variable "image_id" {
  description = "AMI of the media nodes in this region. Null looks up the latest official Debian 12 amd64 AMI here."
  type        = string
  default     = null
}

variable "rtmp_ingress_cidrs" {
  description = "Who may publish to and play from this region's media nodes over RTMP."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "set_region_ec2_defaults" {
  description = "Turn on this region's account-wide EC2 defaults: EBS encryption and IMDSv2 for new instances (libcloud cannot ask for either per instance)."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Retention of this region's VPC flow log group, days."
  type        = number
  default     = 365
}
