variable "name" {
  description = "Cluster id: names every resource and is the sm-cluster tag the controller puts on the media nodes it launches (and the only ones it may terminate). Lowercase letters, digits and '-'."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,22}[a-z0-9]$", var.name))
    error_message = "name must be 3 to 24 lowercase letters, digits or '-', starting with a letter (it ends up in load balancer names of at most 32 characters)."
  }
}

variable "package_spec" {
  description = "pip requirement every instance installs streammanager from, e.g. 'streammanager==0.1.0' or 'git+https://git.example.com/streammanager.git@v0.1.0'."
  type        = string

  validation {
    condition     = length(trimspace(var.package_spec)) > 0 && !can(regex("'", var.package_spec))
    error_message = "package_spec must be a non-empty pip requirement without single quotes."
  }
}

variable "zk_root" {
  description = "Root znode of this cluster in ZooKeeper (SM_ZK_ROOT / AGENT_ZK_ROOT)."
  type        = string
  default     = "/streammanager"

  validation {
    condition     = can(regex("^/[A-Za-z0-9_./-]*$", var.zk_root))
    error_message = "zk_root must be an absolute znode path."
  }
}

variable "vpc_cidr" {
  description = "Private (RFC 1918) CIDR of the home VPC, /16 to /20. Must not overlap the media regions' VPCs, which are peered with it."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition = (
      can(cidrnetmask(var.vpc_cidr)) &&
      tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 20 &&
      can(regex("^(10\\.|172\\.(1[6-9]|2[0-9]|3[01])\\.|192\\.168\\.)", var.vpc_cidr))
    )
    error_message = "vpc_cidr must be a private (RFC 1918) CIDR between /16 and /20."
  }
}

variable "availability_zone_count" {
  description = "How many availability zones the VPC spans; ZooKeeper members, API servers and controllers are spread over them."
  type        = number
  default     = 3

  validation {
    condition     = var.availability_zone_count >= 2 && var.availability_zone_count <= 6
    error_message = "availability_zone_count must be between 2 and 6."
  }
}

variable "nat_gateway_per_zone" {
  description = "One NAT gateway per availability zone (survives the loss of a zone) instead of a single shared one (cheaper). Only boot-time package downloads and cloud API calls of private instances use it."
  type        = bool
  default     = false
}

variable "media_regions" {
  description = "Other AWS regions the controller may launch media nodes in (each needs a media-region module). The home region is always allowed."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for r in var.media_regions : can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", r))])
    error_message = "media_regions must be AWS region names such as eu-west-1."
  }
}

variable "image_id" {
  description = "AMI for every instance (Debian 12 or a derivative with apt, systemd and python3-venv). Null looks up the latest official Debian 12 amd64 AMI."
  type        = string
  default     = null
}

variable "node_image_owners" {
  description = "AWS account ids (or 'amazon') whose AMIs the controller may launch media nodes from. The default is the Debian project's account."
  type        = list(string)
  default     = ["136693071363"]

  validation {
    condition     = length(var.node_image_owners) > 0
    error_message = "node_image_owners must name at least one owner."
  }
}

variable "zookeeper_count" {
  description = "Members of the ZooKeeper ensemble: 3 tolerates one failure, 5 tolerates two."
  type        = number
  default     = 3

  validation {
    condition     = contains([3, 5], var.zookeeper_count)
    error_message = "zookeeper_count must be 3 or 5."
  }
}

variable "zookeeper_instance_type" {
  description = "EC2 instance type of the ZooKeeper members."
  type        = string
  default     = "t3.medium"
}

variable "zookeeper_disk_gb" {
  description = "Root volume size of a ZooKeeper member in GiB (holds the snapshots and transaction log)."
  type        = number
  default     = 30
}

variable "api_instance_type" {
  description = "EC2 instance type of the API servers."
  type        = string
  default     = "c6i.large"
}

variable "api_server_count" {
  description = "API servers behind the load balancer (the Auto Scaling group's minimum and desired size)."
  type        = number
  default     = 2

  validation {
    condition     = var.api_server_count >= 1
    error_message = "api_server_count must be at least 1."
  }
}

variable "api_server_max_count" {
  description = "Upper bound of the API servers' Auto Scaling group."
  type        = number
  default     = 6
}

variable "controller_instance_type" {
  description = "EC2 instance type of the controllers."
  type        = string
  default     = "t3.small"
}

variable "controller_count" {
  description = "Controllers; one leads (ZooKeeper election), the others stand by."
  type        = number
  default     = 2

  validation {
    condition     = var.controller_count >= 2
    error_message = "controller_count must be at least 2 so that a standby can take over."
  }
}

variable "api_port" {
  description = "Port the API servers listen on (SM_BIND) and the load balancer forwards to."
  type        = number
  default     = 5080

  validation {
    condition     = var.api_port > 1024 && var.api_port < 65536 && !contains([2181, 2888, 3888], var.api_port)
    error_message = "api_port must be an unprivileged port other than ZooKeeper's."
  }
}

variable "rtmp_port" {
  description = "RTMP port of the media nodes (AGENT_RTMP_PORT)."
  type        = number
  default     = 1935

  validation {
    condition     = var.rtmp_port > 1024 && var.rtmp_port < 65536 && !contains([2181, 2888, 3888], var.rtmp_port)
    error_message = "rtmp_port must be an unprivileged port other than ZooKeeper's."
  }
}

variable "agent_http_port" {
  description = "Port of the node agents' HTTP endpoints (AGENT_HTTP_PORT); reachable from inside the cluster only."
  type        = number
  default     = 8090

  validation {
    condition     = var.agent_http_port > 1024 && var.agent_http_port < 65536 && !contains([2181, 2888, 3888], var.agent_http_port)
    error_message = "agent_http_port must be an unprivileged port other than ZooKeeper's."
  }
}

variable "certificate_arn" {
  description = "ACM certificate of the API's HTTPS listener (the name clients use to reach the API)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:acm:", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN."
  }
}

variable "api_ingress_cidrs" {
  description = "Who may call the API through the load balancer (broadcasters, players, operators)."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "rtmp_ingress_cidrs" {
  description = "Who may publish to and play from the media nodes over RTMP."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "alb_deletion_protection" {
  description = "Protect the API load balancer from deletion (turn off before destroying the cluster)."
  type        = bool
  default     = true
}

variable "alb_access_logs_bucket" {
  description = "Existing S3 bucket for the load balancer's access logs (its policy must allow ELB log delivery); null disables access logs."
  type        = string
  default     = null
}

variable "waf_web_acl_arn" {
  description = "Regional WAFv2 web ACL to attach to the API load balancer; null attaches none."
  type        = string
  default     = null
}

variable "set_region_ec2_defaults" {
  description = "Turn on this region's account-wide EC2 defaults: EBS encryption and IMDSv2 for new instances. The controller launches media nodes through libcloud, which cannot ask for either per instance. Turn off if someone else owns these settings (then set them there)."
  type        = bool
  default     = true
}

variable "enable_ssm" {
  description = "Let operators reach every instance through SSM Session Manager (attaches AmazonSSMManagedInstanceCore); no instance opens SSH."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Retention of the VPC flow log group, days."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags added to every resource. Must not contain the controller's own tag keys (sm-cluster, sm-group, sm-region, sm-role)."
  type        = map(string)
  default     = {}

  validation {
    condition     = length(setintersection(keys(var.tags), ["sm-cluster", "sm-group", "sm-region", "sm-role"])) == 0
    error_message = "tags must not use the controller's keys sm-cluster, sm-group, sm-region or sm-role."
  }
}
