//! Carrying out the kernel's effects, and the once-a-second sample
//! (watchdogs, memory caps).

use super::*;
use spindle_types::control::{EventKind, ProcessEvent};

/// What an event carries besides its kind.
#[derive(Default)]
struct EventDetail {
    pid: Option<u32>,
    exit: Option<spindle_types::ExitInfo>,
    delay: Option<Duration>,
}

impl Node {
    /// Tells `events` subscribers what happened to `num` (nothing is built
    /// while nobody listens).
    fn tell(&self, event: EventKind, num: ProcessNum, detail: EventDetail) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let entry = self.kernel.get(num);
        // A removed process has left the kernel: its address is still here.
        let address = entry
            .and_then(|e| self.wasm.address(num, &e.spec))
            .or_else(|| self.procs.get(&num).and_then(Attached::address).cloned());
        let _ = self.events.send(ProcessEvent {
            event,
            id: num,
            name: entry.and_then(|e| e.spec.name.clone()),
            address: address.map(|a| a.to_string()),
            at_ms: wall_ms(),
            pid: detail.pid,
            exit: detail.exit,
            delay_ms: detail.delay.map(|d| d.as_millis() as u64),
        });
    }

    /// A process the operator started holds the network right exactly
    /// when its spec says `network`; a spawned child keeps whatever its
    /// parent passed it.
    fn network_right(&self, num: ProcessNum, spec: &ProcessSpec) {
        let Some(addr) = self.wasm.address(num, spec) else {
            return;
        };
        let bus = self.wasm.bus();
        let right = spindle_bus::Capability::network();
        if spec.network {
            bus.grant(&addr.process, [right]);
        } else if spec.parent.is_none() && bus.holds(&addr.process, &right) {
            bus.revoke(&addr.process, &[right]);
        }
    }

    /// Whether the rights of run `num`, on the bus at `addr`, go unwritten:
    /// a transient child never on disk (a reboot ends it anyway), unless
    /// another entry shares its address (a stopped namesake), whose rights
    /// are the same record.
    fn rights_unsaved(&self, num: ProcessNum, addr: &spindle_types::Address) -> bool {
        !self.kernel.is_on_disk(num)
            && self.kernel.get(num).is_some_and(|e| !e.durable())
            && self
                .kernel
                .named(&addr.process.process)
                .filter(|e| e.num != num)
                .all(|e| {
                    self.wasm
                        .address(e.num, &e.spec)
                        .is_none_or(|a| a.process != addr.process)
                })
    }

    /// Carries out the kernel's effects until it has none left.
    pub(super) fn apply(&mut self) {
        loop {
            let effects = self.kernel.take_effects();
            if effects.is_empty() {
                break;
            }
            let mut asks = vec![];
            let mut kills = vec![];
            for effect in effects {
                match effect {
                    Effect::Spawn { num, run, spec } => {
                        self.network_right(num, &spec);
                        let tap = self.attached(num).tap.clone();
                        let result = match &spec.program {
                            Program::Native { .. } => self.spawn_native(num, run, &spec, tap),
                            Program::Wasm { .. } => {
                                match self.wasm.spawn(num, run, &spec, Some(tap)) {
                                    Ok(addr) => {
                                        if self.rights_unsaved(num, &addr) {
                                            self.wasm.bus().unsaved(&addr.process);
                                        }
                                        self.attached(num).bus = Some(OnBus::Wasm(addr));
                                        Ok(None)
                                    }
                                    Err(e) => Err(e.to_string()),
                                }
                            }
                        };
                        match &result {
                            Err(e) => tracing::error!("process {num}: {e}"),
                            Ok(pid) => self.tell(
                                EventKind::Started,
                                num,
                                EventDetail {
                                    pid: *pid,
                                    ..Default::default()
                                },
                            ),
                        }
                        self.kernel
                            .spawned(num, run, result, Instant::now(), wall_ms());
                    }
                    // A wasm process has no signals: it is asked by message,
                    // and killed when the grace is over.
                    Effect::AskStop { num, run, signal } => {
                        self.tell(EventKind::Stopping, num, EventDetail::default());
                        let a = self.procs.get(&num);
                        if let Some(addr) = a.and_then(Attached::wasm) {
                            self.wasm.ask_stop(num, run, addr)
                        } else if !a.and_then(Attached::bridge).is_some_and(Bridge::ask_stop) {
                            // A process with an IPC channel is asked by message first.
                            asks.push((num, run, signal))
                        }
                    }
                    Effect::Kill { num, run }
                        if self.procs.get(&num).and_then(Attached::wasm).is_some() =>
                    {
                        self.wasm.kill(num, run)
                    }
                    Effect::Kill { num, run } => kills.push((num, run)),
                    Effect::Exited {
                        num,
                        info,
                        restart_in,
                        transient,
                    } => {
                        let bus = self.wasm.bus().clone();
                        let killed = info.reason == spindle_types::ExitReason::Killed;
                        match self.procs.get_mut(&num).and_then(|a| a.bus.as_mut()) {
                            Some(OnBus::Native { address, bridge }) => {
                                if bridge.take().is_some() {
                                    // Its mailbox closes; its bridge ends.
                                    bus.unregister(&address.process);
                                }
                                if killed {
                                    bus.revoke_issued_by(address);
                                }
                            }
                            // What a killed process issued dies with it.
                            Some(OnBus::Wasm(address)) if killed => bus.revoke_issued_by(address),
                            _ => {}
                        }
                        // A transient child that did its job (a transaction)
                        // is not news: the trace still shows its end.
                        let done_transient =
                            transient && info.reason == spindle_types::ExitReason::Completed;
                        match restart_in {
                            Some(d) => tracing::info!(
                                "process {num}: {info}; restarting in {}",
                                spindle_types::units::format_duration(d)
                            ),
                            None if done_transient => tracing::debug!("process {num}: {info}"),
                            None => tracing::info!("process {num}: {info}"),
                        }
                        let stays = restart_in.is_none()
                            && self
                                .kernel
                                .get(num)
                                .is_some_and(|e| matches!(e.state, State::Stopped));
                        self.tell(
                            EventKind::Exited,
                            num,
                            EventDetail {
                                exit: Some(info),
                                ..Default::default()
                            },
                        );
                        if let Some(d) = restart_in {
                            let delay = Some(d);
                            self.tell(
                                EventKind::Restarting,
                                num,
                                EventDetail {
                                    delay,
                                    ..Default::default()
                                },
                            );
                        } else if stays {
                            self.tell(EventKind::Stopped, num, EventDetail::default());
                        }
                    }
                    Effect::Settled { num } => {
                        self.tell(EventKind::Stopped, num, EventDetail::default())
                    }
                    Effect::Removed { num } => {
                        self.tell(EventKind::Deleted, num, EventDetail::default());
                        if let Some(addr) =
                            self.procs.remove(&num).as_ref().and_then(Attached::address)
                        {
                            // Gone for good: nothing it held or issued may
                            // pass to a later process of the same name.
                            self.wasm.bus().revoke_issued_by(addr);
                            self.wasm.bus().forget(&addr.process);
                        }
                    }
                }
            }
            self.driver.ask_stop(&asks);
            self.driver.kill(&kills);
        }
    }

    pub(super) fn sample(&mut self) {
        if self.driver.live_runs() == 0 {
            return;
        }
        let now = Instant::now();
        // Watchdogs: a process on the bus that has sent nothing for its
        // heartbeat period is hung.
        for (num, bridge) in self
            .procs
            .iter()
            .filter_map(|(n, a)| Some((n, a.bridge()?)))
        {
            let Some(e) = self.kernel.get(*num) else {
                continue;
            };
            let (Program::Native { ipc: Some(ipc), .. }, Some(run)) =
                (&e.spec.program, e.state.run())
            else {
                continue;
            };
            if let Some(why) = bridge.fault() {
                tracing::warn!("process {num}: {why}");
                self.kernel.fault(*num, run, why, now);
                continue;
            }
            if let Some(period) = ipc.heartbeat()
                && matches!(e.state, State::Starting { .. } | State::Running { .. })
                && bridge.silent_for() > period
            {
                let detail = format!(
                    "heartbeat lost: nothing on its IPC channel for {} (heartbeat {})",
                    spindle_types::units::format_duration(bridge.silent_for()),
                    spindle_types::units::format_duration(period)
                );
                tracing::warn!("process {num}: {detail}");
                self.kernel.hung(*num, run, detail, now);
            }
        }
        for (num, run, rss) in self.driver.sample(now) {
            let Some(cap) = self.kernel.get(num).and_then(|e| e.spec.max_memory) else {
                continue;
            };
            if rss > cap {
                let detail = format!(
                    "memory limit {} exceeded ({} resident)",
                    spindle_types::units::format_size(cap),
                    spindle_types::units::format_size(rss)
                );
                tracing::warn!("process {num}: {detail}");
                self.kernel.fault(num, run, detail, now);
            }
        }
    }
}
