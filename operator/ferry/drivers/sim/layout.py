"""File names inside a sim VM's directory ``<data_dir>/vms/<ns>__<name>/``."""

SPEC_FILE = "vm.json"  # the spec and image sizes (written by the driver)
PID_FILE = "pid"
LOCK_FILE = "lock"  # flock held by the live VM process: never two processes per VM
SOCKET_FILE = "control.sock"
DISK_FILE = "disk.img"  # sparse, 64 KiB blocks
MEMORY_FILE = "mem.img"  # 4 KiB pages
GUEST_FILE = "guest.json"  # guest state kept across stop/start (sequence number, workload)
MIGRATION_FILE = "migration.json"  # stats of the last migration, for queries after exit
WRITE_LOG = "writes.log"  # with write_log: every acknowledged guest write
LOG_FILE = "log"  # the VM process's own log
