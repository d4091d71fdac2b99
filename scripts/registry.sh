#!/usr/bin/env bash
# A local OCI registry for humans (Debian's docker-registry, CNCF distribution) on loopback with
# filesystem storage under a data directory. Until aloftd supervises it, this is the embedded
# registry; tests start their own through aloft-testkit.
#
#   scripts/registry.sh start  [DATA_DIR] [PORT]   # default: ${ALOFT_DATA_DIR:-~/.local/share/aloft}/registry, 5000
#   scripts/registry.sh stop   [DATA_DIR]
#   scripts/registry.sh status [DATA_DIR]
#
# Push to it with e.g. `skopeo copy --dest-tls-verify=false oci:DIR:TAG docker://127.0.0.1:5000/NAME:TAG`.
set -euo pipefail

cmd="${1:-status}"
dir="${2:-${ALOFT_DATA_DIR:-$HOME/.local/share/aloft}/registry}"
port="${3:-5000}"
pidfile="$dir/registry.pid"
bin=/usr/bin/docker-registry

# The pid in the pid file, if that process is still our registry.
running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "docker-registry serve $dir/config.yml" || return 1
  echo "$pid"
}

case "$cmd" in
  start)
    [ -x "$bin" ] || { echo "$bin not found: run scripts/setup.sh" >&2; exit 1; }
    if pid="$(running_pid)"; then
      echo "registry already running (pid $pid, $dir)"
      exit 0
    fi
    mkdir -p "$dir/storage"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
    nohup "$bin" serve "$dir/config.yml" >>"$dir/registry.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "registry on 127.0.0.1:$port (pid $(cat "$pidfile"), data $dir, log $dir/registry.log)"
        exit 0
      fi
      running_pid >/dev/null || { echo "registry exited; see $dir/registry.log" >&2; exit 1; }
      sleep 0.1
    done
    echo "registry did not listen on 127.0.0.1:$port within 10 s; see $dir/registry.log" >&2
    exit 1
    ;;
  stop)
    if pid="$(running_pid)"; then
      kill "$pid"
      for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
      rm -f "$pidfile"
      echo "stopped (pid $pid)"
    else
      rm -f "$pidfile"
      echo "not running"
    fi
    ;;
  status)
    if pid="$(running_pid)"; then
      echo "running (pid $pid, data $dir)"
    else
      echo "not running"
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 start|stop|status [DATA_DIR] [PORT]" >&2
    exit 2
    ;;
esac
