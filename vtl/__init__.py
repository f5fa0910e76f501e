"""vtl: a storage gateway appliance (tape, volume and file gateway) served over iSCSI and NFS."""

__version__ = "0.1.0"

# Our iSCSI naming authority (RFC 7143 3.2.6.3.1); configurable per appliance.
DEFAULT_IQN_AUTHORITY = "iqn.2026-11.org.vtl-appliance"
