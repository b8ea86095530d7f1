variable "project_id" {
  description = "GCP project of the cluster. The controller's launch rights are granted project-wide (GCE IAM cannot be limited by label), so a project per cluster is the cleanest boundary."
  type        = string
}

variable "name" {
  description = "Cluster id: names every resource and is the sm-cluster label the controller puts on the media nodes it launches. Lowercase letters, digits and '-'."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,16}[a-z0-9]$", var.name))
    error_message = "name must be 3 to 18 lowercase letters, digits or '-', starting with a letter (service account ids derived from it are limited to 30 characters)."
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

variable "home_region" {
  description = "Region of the control plane: ZooKeeper, API servers, controllers and the NAT they use. Must be a key of subnet_cidrs."
  type        = string
}

variable "subnet_cidrs" {
  description = "Private (RFC 1918) CIDR of the cluster's subnet in each region, home region included; media nodes can be launched in every region listed. All subnets are in one global VPC network, so agents everywhere reach ZooKeeper on its internal addresses."
  type        = map(string)

  validation {
    condition = length(var.subnet_cidrs) > 0 && alltrue([
      for cidr in values(var.subnet_cidrs) :
      can(cidrnetmask(cidr)) && can(regex("^(10\\.|172\\.(1[6-9]|2[0-9]|3[01])\\.|192\\.168\\.)", cidr))
    ])
    error_message = "subnet_cidrs must map regions to private (RFC 1918) CIDRs."
  }
}

variable "image" {
  description = "Boot image of every instance, media nodes included: Debian 12 or a derivative with apt, systemd and python3-venv."
  type        = string
  default     = "projects/debian-cloud/global/images/family/debian-12"
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

variable "zookeeper_machine_type" {
  description = "Machine type of the ZooKeeper members."
  type        = string
  default     = "e2-medium"
}

variable "zookeeper_disk_gb" {
  description = "Boot disk size of a ZooKeeper member in GB (holds the snapshots and transaction log)."
  type        = number
  default     = 30
}

variable "api_machine_type" {
  description = "Machine type of the API servers."
  type        = string
  default     = "e2-standard-2"
}

variable "api_server_count" {
  description = "API servers in the regional managed instance group behind the load balancer."
  type        = number
  default     = 2

  validation {
    condition     = var.api_server_count >= 1
    error_message = "api_server_count must be at least 1."
  }
}

variable "controller_machine_type" {
  description = "Machine type of the controllers."
  type        = string
  default     = "e2-small"
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

variable "api_domains" {
  description = "DNS names of the API: the Google-managed certificate covers them; point them at the api_address output."
  type        = list(string)

  validation {
    condition     = length(var.api_domains) > 0
    error_message = "api_domains needs at least one name."
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

variable "rtmp_ingress_cidrs" {
  description = "Who may publish to and play from the media nodes over RTMP."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "allow_iap_ssh" {
  description = "Allow SSH through Identity-Aware Proxy (35.235.240.0/20) to every instance, for operators with IAP and OS Login rights; nothing else opens SSH."
  type        = bool
  default     = true
}

variable "enable_apis" {
  description = "Enable the Compute, IAM and Secret Manager APIs in the project (keep them enabled on destroy)."
  type        = bool
  default     = true
}

variable "labels" {
  description = "Labels added to every resource that takes labels. Must not contain the controller's own keys (sm-cluster, sm-group, sm-region, sm-role)."
  type        = map(string)
  default     = {}

  validation {
    condition     = length(setintersection(keys(var.labels), ["sm-cluster", "sm-group", "sm-region", "sm-role"])) == 0
    error_message = "labels must not use the controller's keys sm-cluster, sm-group, sm-region or sm-role."
  }
}
