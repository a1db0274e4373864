"""Provisioning: everything that turns a device id into credentials a hardened broker accepts.

Modules, one reason each:
- `identity`      which device ids / account names are safe to put in broker files
- `passwords`     random secrets and Mosquitto 2 `$7$` (PBKDF2-SHA512) password hashes
- `acl`           Mosquitto ACL text, built from the topic contract's functions
- `tls`           a private CA, the broker's server certificate, optional device client certs
- `broker_conf`   renders `broker_config/mosquitto.prod.conf` and sizes `max_packet_size`
- `accounts`      the service accounts (server, monitor) and their secrets on disk
- `broker_files`  writes password + ACL + config files atomically and reloads a running broker
- `registry_link` the only place that talks to the SQL registry
- `wheels`        builds the offline wheelhouse a device installs from
- `bundle`        assembles a device's flashable bundle (dir + tarball)
"""
