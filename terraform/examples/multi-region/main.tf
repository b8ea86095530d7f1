# Two independent streammanager clusters, each spanning two regions of one cloud:
#
#   AWS: control plane in us-east-1 (3 ZooKeeper members over 3 zones, API servers behind an ALB, two
#        controllers) with media nodes in us-east-1 and eu-west-1; the eu-west-1 VPC is peered with the
#        home VPC so its agents reach ZooKeeper on private addresses.
#   GCE: control plane in us-central1 with media nodes in us-central1 and europe-west1, all in one global
#        VPC network.
#
# Each cluster has one ZooKeeper ensemble, in its home region, that serves every region of the cluster:
# agents far from it pay one round trip per registry write (load reports are batched), while lookups are
# answered from the API servers' memory. To deploy on one cloud only, delete aws.tf or gce.tf (and the
# matching outputs). A single cluster spanning both clouds would need private connectivity between them
# (HA VPN), which this example does not build.

locals {
  labels = {
    app        = "streammanager"
    managed-by = "terraform"
  }
}
