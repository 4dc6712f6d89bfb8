// pm2 ecosystem file for the muster daemons, for hosts without systemd.
//
//   pm2 start ecosystem.config.js --only muster-hub       # on the hub host
//   pm2 start ecosystem.config.js --only muster-sidecar   # on an agent host
//   pm2 save && pm2 startup                               # survive reboots
//
// Run pm2 as the daemon's own unprivileged user (e.g.
// `sudo -u muster-sidecar -H pm2 start ...`), not as root: the sidecar's agents
// run as whatever user pm2 runs as. deploy/install-*.sh --supervisor pm2 print
// the exact command.
//
// Paths come from the environment when set (the install scripts set them for
// --root installs), else the defaults the systemd units use:
//   MUSTER_HUB_BIN      /usr/local/bin/muster-hub
//   MUSTER_HUB_DIR      /var/lib/muster-hub
//   MUSTER_SIDECAR_BIN  /usr/local/bin/muster-sidecar
//   MUSTER_SIDECAR_DIR  /var/lib/muster-sidecar
//
// Differences from systemd worth knowing:
// - pm2 stops a process with SIGINT (not SIGTERM) unless the pm2 daemon itself
//   runs with PM2_KILL_SIGNAL=SIGTERM; a per-app kill signal is ignored by pm2.
//   Both muster daemons treat SIGINT exactly like SIGTERM (drain, exit 0).
// - There is no readiness or watchdog protocol: NOTIFY_SOCKET is unset and the
//   daemons skip sd_notify. A hung core is not detected by pm2 (use systemd
//   where you can).
// - No sandbox and no LoadCredential: the keys are read from the 0600 files in
//   the data directory.

'use strict';

const env = (name, fallback) => process.env[name] || fallback;

// Shared restart policy. The numbers mirror the systemd units: the daemons
// drain within 30 s (TimeoutStopSec=30s there), restarts back off instead of
// hammering the hub, and a configuration error (exit 78) is not retried.
const common = {
  // Native binaries, not node scripts: pm2 must exec them directly.
  interpreter: 'none',
  exec_mode: 'fork',
  instances: 1,
  // Restart on crash or any non-zero exit ...
  autorestart: true,
  // ... except exit 78 (EX_CONFIG): the configuration is invalid and a restart
  // cannot fix it. pm2 leaves the app down (pid 0, the restart count stops),
  // but `pm2 ls` labels it "waiting restart": that is pm2's word for an app it
  // will not restart on its own, not a restart to come. `pm2 logs muster-hub`
  // shows the reason (the file, line and key); fix it and `pm2 restart`.
  // A crash (a signal, or any other exit code) restarts after the backoff
  // below and shows "online" again, the ↺ column counting restarts.
  // (tests/deploy/pm2.sh checks both with a real pm2.)
  stop_exit_codes: [78],
  // Exponential backoff between restarts: 200 ms, then x1.5 each time up to
  // pm2's cap of 15 s; reset once the process has stayed up for a while. A
  // crash-looping sidecar therefore reconnects to the hub less and less often.
  exp_backoff_restart_delay: 200,
  // A run shorter than this counts as an unstable start ...
  min_uptime: '10s',
  // ... and after this many unstable starts in a row pm2 gives up and marks the
  // app "errored" (like systemd's StartLimitBurst=5), instead of looping forever.
  max_restarts: 5,
  // Time between pm2's stop signal and SIGKILL: a little above the daemons'
  // 30 s graceful-shutdown budget (systemd TimeoutStopSec=30s), so a drain
  // that persists in-flight work is never cut short by pm2.
  kill_timeout: 35000,
  // Do not restart on file changes: binaries are replaced by the installer,
  // which restarts explicitly.
  watch: false,
  // No pm2 timestamps: every daemon log line carries its own, and a second
  // one only makes lines longer. (The daemons print no colour codes either:
  // their output is not a terminal under pm2.)
  time: false,
  merge_logs: true,
};

module.exports = {
  apps: [
    {
      ...common,
      name: 'muster-hub',
      script: env('MUSTER_HUB_BIN', '/usr/local/bin/muster-hub'),
      args: ['serve', '--data-dir', env('MUSTER_HUB_DIR', '/var/lib/muster-hub')],
      cwd: env('MUSTER_HUB_DIR', '/var/lib/muster-hub'),
      env: {
        // Log level of the daemons' tracing output (pm2 keeps it in its logs).
        RUST_LOG: 'info',
      },
    },
    {
      ...common,
      name: 'muster-sidecar',
      script: env('MUSTER_SIDECAR_BIN', '/usr/local/bin/muster-sidecar'),
      args: ['run', '--data-dir', env('MUSTER_SIDECAR_DIR', '/var/lib/muster-sidecar')],
      cwd: env('MUSTER_SIDECAR_DIR', '/var/lib/muster-sidecar'),
      // Signal only the sidecar itself on stop/restart, never its process tree:
      // agent runs (own process groups, children of the sidecar's reaper) must survive a
      // sidecar restart; the restarted sidecar collects their exit status from
      // its state directory. pm2's default (treekill: true) would kill them,
      // like systemd's KillMode=control-group. (Same reasoning as
      // KillMode=process in systemd/muster-sidecar.service.)
      treekill: false,
      env: {
        RUST_LOG: 'info',
      },
    },
  ],
};
