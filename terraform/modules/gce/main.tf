# streammanager on Google Compute Engine: one global VPC network with a subnet per region, a ZooKeeper
# ensemble, API servers behind a global external Application Load Balancer and the controllers in the home
# region, plus the service account, network and boot script the controller launches media nodes with in
# every region of var.subnet_cidrs.
#
# Labelling rule: everything here carries "streammanager-cluster" = var.name. The controller's own label
# "sm-cluster" is reserved for the media nodes it launches: it lists, and may only delete, instances
# carrying it, so no instance created here may ever carry it.
#
# Firewall rules select instances by service account, not by network tag: the controller may set tags on
# the instances it creates, but may only run them as the node service account.

locals {
  labels = merge(var.labels, { "streammanager-cluster" = var.name })

  home_cidr = var.subnet_cidrs[var.home_region]
  # ZooKeeper members get fixed internal addresses (.10, .11 ... of the home subnet) so that the
  # connection string is known at plan time and survives a member's replacement.
  zookeeper_ips = [for i in range(var.zookeeper_count) : cidrhost(local.home_cidr, 10 + i)]
  zk_hosts      = join(",", [for ip in local.zookeeper_ips : "${ip}:2181"])

  role_prefix = "streammanager_${replace(var.name, "-", "_")}"

  node_boot_script_template = templatefile("${path.module}/templates/node-boot.sh.tftpl", {
    agent_http_port = var.agent_http_port
    rtmp_port       = var.rtmp_port
  })

  install_streammanager = templatefile("${path.module}/templates/install.sh.tftpl", {
    package_spec = var.package_spec
  })
}

resource "google_project_service" "this" {
  for_each           = var.enable_apis ? toset(["compute.googleapis.com", "iam.googleapis.com", "secretmanager.googleapis.com"]) : toset([])
  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

# -- network -----------------------------------------------------------------------------------------------

resource "google_compute_network" "this" {
  project                 = var.project_id
  name                    = var.name
  description             = "streammanager ${var.name}"
  auto_create_subnetworks = false
  routing_mode            = "GLOBAL"

  depends_on = [google_project_service.this]
}

resource "google_compute_subnetwork" "this" {
  for_each                 = var.subnet_cidrs
  project                  = var.project_id
  name                     = "${var.name}-${each.key}"
  region                   = each.key
  network                  = google_compute_network.this.id
  ip_cidr_range            = each.value
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }

  lifecycle {
    precondition {
      condition     = contains(keys(var.subnet_cidrs), var.home_region)
      error_message = "subnet_cidrs must include the home region."
    }
  }
}

# Private instances of the home region (ZooKeeper, API servers, controllers) download packages and call
# Google APIs through Cloud NAT. Media nodes have external addresses of their own.
resource "google_compute_router" "home" {
  project = var.project_id
  name    = "${var.name}-${var.home_region}"
  region  = var.home_region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "home" {
  project                            = var.project_id
  name                               = "${var.name}-${var.home_region}"
  router                             = google_compute_router.home.name
  region                             = var.home_region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                    = google_compute_subnetwork.this[var.home_region].id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# -- service accounts --------------------------------------------------------------------------------------

resource "google_service_account" "zookeeper" {
  project      = var.project_id
  account_id   = "${var.name}-zookeeper"
  display_name = "streammanager ${var.name} ZooKeeper"

  depends_on = [google_project_service.this]
}

resource "google_service_account" "api" {
  project      = var.project_id
  account_id   = "${var.name}-api"
  display_name = "streammanager ${var.name} API servers"

  depends_on = [google_project_service.this]
}

resource "google_service_account" "controller" {
  project      = var.project_id
  account_id   = "${var.name}-controller"
  display_name = "streammanager ${var.name} controllers"

  depends_on = [google_project_service.this]
}

resource "google_service_account" "node" {
  project      = var.project_id
  account_id   = "${var.name}-node"
  display_name = "streammanager ${var.name} media nodes"

  depends_on = [google_project_service.this]
}

locals {
  service_accounts = {
    zookeeper  = google_service_account.zookeeper.email
    api        = google_service_account.api.email
    controller = google_service_account.controller.email
    node       = google_service_account.node.email
  }
}

# Every instance writes its logs and metrics; nothing more at project level except the controller's role.
resource "google_project_iam_member" "telemetry" {
  for_each = {
    for pair in setproduct(keys(local.service_accounts), ["roles/logging.logWriter", "roles/monitoring.metricWriter"]) :
    "${pair[0]}-${pair[1]}" => { account = pair[0], role = pair[1] }
  }
  project = var.project_id
  role    = each.value.role
  member  = "serviceAccount:${local.service_accounts[each.value.account]}"
}

# -- controller: exactly what libcloud's GCE driver calls to launch, list, label and delete nodes ---------

resource "google_project_iam_custom_role" "controller" {
  project     = var.project_id
  role_id     = "${local.role_prefix}_controller"
  title       = "streammanager ${var.name} controller"
  description = "Launch, list and delete the cluster's media nodes through libcloud"
  permissions = [
    "compute.instances.create",
    "compute.instances.delete",
    "compute.instances.get",
    "compute.instances.list",
    "compute.instances.setLabels",
    "compute.instances.setMetadata",
    "compute.instances.setTags",           # instances.insert with network tags
    "compute.instances.setServiceAccount", # instances.insert with the node service account
    "compute.disks.create",
    "compute.subnetworks.use",
    "compute.subnetworks.useExternalIp",
    "compute.zoneOperations.get",
    # libcloud's driver resolves names before it creates: zones and regions (to place the subnetwork),
    # machine type, disk type, network and subnetwork. Pass the image as a full URL (node_launch.image)
    # so that it reads the public image directly instead of listing the project's images.
    "compute.zones.get",
    "compute.zones.list",
    "compute.regions.list",
    "compute.machineTypes.get",
    "compute.diskTypes.get",
    "compute.networks.get",
    "compute.subnetworks.get",
  ]

  depends_on = [google_project_service.this]
}

resource "google_project_iam_member" "controller" {
  project = var.project_id
  role    = google_project_iam_custom_role.controller.id
  member  = "serviceAccount:${google_service_account.controller.email}"
}

# Running an instance as the node service account needs actAs on that account, granted on it alone.
resource "google_project_iam_custom_role" "act_as_node" {
  project     = var.project_id
  role_id     = "${local.role_prefix}_act_as_node"
  title       = "streammanager ${var.name} run instances as the node account"
  description = "iam.serviceAccounts.actAs, granted on the node service account only"
  permissions = ["iam.serviceAccounts.actAs"]

  depends_on = [google_project_service.this]
}

resource "google_service_account_iam_member" "controller_acts_as_node" {
  service_account_id = google_service_account.node.name
  role               = google_project_iam_custom_role.act_as_node.id
  member             = "serviceAccount:${google_service_account.controller.email}"
}

# -- the admin token (SM_ACCESS_TOKEN) -----------------------------------------------------------------
# Generated here, so it is also in the Terraform state: keep the state encrypted and access-controlled.
# API servers read it from Secret Manager each time they start; operators read it the same way.

resource "random_password" "access_token" {
  length  = 48
  special = false
}

resource "google_secret_manager_secret" "access_token" {
  project   = var.project_id
  secret_id = "${var.name}-access-token"
  labels    = local.labels

  replication {
    user_managed {
      replicas {
        location = var.home_region
      }
    }
  }

  depends_on = [google_project_service.this]
}

resource "google_secret_manager_secret_version" "access_token" {
  secret      = google_secret_manager_secret.access_token.id
  secret_data = random_password.access_token.result
}

resource "google_secret_manager_secret_iam_member" "api_reads_access_token" {
  project   = var.project_id
  secret_id = google_secret_manager_secret.access_token.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.api.email}"
}

# -- the cluster's ZooKeeper identity (SM_ZK_AUTH) -----------------------------------------------------
# One digest identity per cluster, "streammanager:<password>": every znode the cluster creates gets an ACL
# for it alone. The password has letters and digits only, so nothing splits USER:PASSWORD at a second ":"
# and nothing needs quoting in a shell, a systemd unit or the nodes' boot script. Generated here, so it is
# also in the Terraform state. API servers and controllers read it from Secret Manager each time they
# start; the controller hands it to the media nodes it launches (the boot script's zk_auth placeholder),
# so the node service account cannot read it. Operators read it the same way, for their own ZooKeeper
# clients.

resource "random_password" "zk_auth" {
  length  = 32
  special = false
}

resource "google_secret_manager_secret" "zk_auth" {
  project   = var.project_id
  secret_id = "${var.name}-zk-auth"
  labels    = local.labels

  replication {
    user_managed {
      replicas {
        location = var.home_region
      }
    }
  }

  depends_on = [google_project_service.this]
}

resource "google_secret_manager_secret_version" "zk_auth" {
  secret      = google_secret_manager_secret.zk_auth.id
  secret_data = "streammanager:${random_password.zk_auth.result}"
}

# the API servers and the controllers, and no one else
resource "google_secret_manager_secret_iam_member" "reads_zk_auth" {
  for_each = {
    api        = google_service_account.api.email
    controller = google_service_account.controller.email
  }
  project   = var.project_id
  secret_id = google_secret_manager_secret.zk_auth.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${each.value}"
}
