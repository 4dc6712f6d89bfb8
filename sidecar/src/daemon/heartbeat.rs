//! Hellos and heartbeats: what this sidecar tells the hub about itself, and
//! the self-test and idle health command that go with them.

use muster_protocol::msg::{Heartbeat, Hello, SessionMsg, SidecarState};

use super::Daemon;
use crate::config::WorkspaceMode;
use crate::core::Core;

impl Daemon {
    pub(super) fn hello(&self, core: &Core) -> Hello {
        Hello {
            version: env!("CARGO_PKG_VERSION").into(),
            agent: self.cfg.name.clone(),
            capabilities: self.cfg.capabilities.clone(),
            slots: self.cfg.slots,
            resume: core.held(),
            workspace: match self.cfg.workspace.mode {
                WorkspaceMode::Shared => muster_protocol::work::WorkspaceMode::Shared,
                WorkspaceMode::Dir => muster_protocol::work::WorkspaceMode::Dir,
                WorkspaceMode::Git => muster_protocol::work::WorkspaceMode::Git,
            },
        }
    }

    pub(super) fn heartbeat(&mut self, core: &Core) {
        if self.tx.is_none() {
            return;
        }
        let rtt = self.conn.as_ref().map(|c| c.rtt().as_micros() as u64);
        let host = match &mut self.system {
            Ok(s) => crate::host::figures(s, &self.cfg.data_dir),
            Err(_) => muster_protocol::msg::HostFigures::default(),
        };
        self.last_self_test = crate::host::self_test(
            &self.cfg.agent,
            rtt,
            host.disk_free_bytes,
            self.cfg.disk_floor_mb,
            self.health.clone(),
        );
        self.hb_seq += 1;
        let busy = core.busy() as u32;
        // Output quiet for a heartbeat: its last lines go with the figures.
        let activity = self.activity(core, core.heartbeat_interval());
        let hb = Heartbeat {
            seq: self.hb_seq,
            state: if self.draining {
                SidecarState::Draining
            } else {
                SidecarState::Ready
            },
            tasks: core.held(),
            free_slots: self.cfg.slots.saturating_sub(busy),
            self_test: self.last_self_test.clone(),
            host,
            activity,
        };
        self.send(SessionMsg::Heartbeat(hb));
        if busy == 0 && !self.cfg.agent.health_command.is_empty() && !self.health_running {
            // The health command runs when idle, off the loop; its result joins the next heartbeat.
            self.health_running = true;
            let agent = self.cfg.agent.clone();
            let tx = self.health_tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(crate::agent::run_health(&agent).await).await;
            });
        }
    }
}
