//! Starting runs: the checks before a start, native runs on the bus,
//! and processes' own spawn calls.

use super::*;

impl Node {
    /// A wasm spec can start: its component loads, and its address is free.
    pub(super) fn check_wasm(
        &mut self,
        spec: &ProcessSpec,
        earlier: &HashSet<Address>,
    ) -> Result<(), String> {
        self.wasm.preflight(spec).map_err(|e| e.to_string())?;
        self.check_address(spec, earlier)
    }

    /// A process on the bus can start if its address is free (among running
    /// processes and the addresses the same request claimed before it,
    /// `earlier`). Looks up, never scans.
    pub(super) fn check_address(
        &self,
        spec: &ProcessSpec,
        earlier: &HashSet<Address>,
    ) -> Result<(), String> {
        let Some(name) = &spec.name else {
            return Ok(());
        };
        let probe = ProcessNum(0);
        let Some(addr) = self.wasm.address(probe, spec) else {
            return Ok(());
        };
        format!("{}", addr.process)
            .parse::<spindle_types::ProcessId>()
            .map_err(|e| format!("name {name:?} cannot be part of an address: {e}"))?;
        // Entries that could hold the address: those of the same name, and
        // for a name that is a number, the unnamed process of that id.
        let by_id = name
            .parse::<u64>()
            .ok()
            .and_then(|n| self.kernel.get(ProcessNum(n)));
        let taken = self
            .kernel
            .named(name)
            .chain(by_id)
            .filter(|e| e.state.is_live() || e.desired == spindle_kernel::Desired::Running)
            .filter_map(|e| self.wasm.address(e.num, &e.spec))
            .any(|a| a == addr)
            || earlier.contains(&addr);
        if taken {
            return Err(format!(
                "address {addr} is already used by another process: choose another name"
            ));
        }
        Ok(())
    }

    /// Starts a native run; one with an IPC channel is put on the bus first
    /// (so its address is taken and messages can wait for it) and bridged.
    pub(super) fn spawn_native(
        &mut self,
        num: ProcessNum,
        run: spindle_kernel::RunId,
        spec: &ProcessSpec,
        tap: spindle_logs::LogTap,
    ) -> Result<Option<u32>, String> {
        let Some(addr) = self.wasm.address(num, spec) else {
            return self
                .driver
                .spawn(num, run, spec, Some(tap), None)
                .map(|s| Some(s.pid))
                .map_err(|e| e.to_string());
        };
        let bus = self.wasm.bus();
        let public = spec.program.bus().is_some_and(|(_, p)| p);
        let mailbox = bus
            .register_sized(addr.clone(), public, spec.budgets.mailbox_bytes() as usize)
            .map_err(|e| e.to_string())?;
        let spawned = match self.driver.spawn(num, run, spec, Some(tap), Some(&addr)) {
            Ok(s) => s,
            Err(e) => {
                bus.unregister(&addr.process);
                return Err(e.to_string());
            }
        };
        let channel = spawned.channel.expect("a channel for a process on the bus");
        let spawner = match &spec.program {
            Program::Native { cwd, .. } => Some(Spawner {
                calls: self.wasm.spawn_calls(),
                dir: cwd.clone(),
            }),
            Program::Wasm { .. } => None,
        };
        let bridge = match Bridge::start(channel, addr.clone(), bus.clone(), mailbox, spawner) {
            Ok(b) => Some(b),
            // The process runs without the bus; it sees its channel closed.
            Err(e) => {
                bus.unregister(&addr.process);
                tracing::error!("process {num}: its IPC channel could not be served: {e}");
                None
            }
        };
        self.attached(num).bus = Some(OnBus::Native {
            address: addr,
            bridge,
        });
        Ok(Some(spawned.pid))
    }

    /// A wasm process asked to spawn a child: start it through the kernel,
    /// then hand out the capabilities that go with it.
    pub(super) fn spawn_for(&mut self, call: SpawnCall) {
        use spindle_bus::SpawnError;
        let answer = (|| {
            let found = call.resolve()?;
            let spec = ProcessSpec {
                name: call.name.clone(),
                program: Program::Wasm {
                    path: found.path.clone(),
                    package: call.parent.process.package.clone(),
                    public: call.public,
                },
                env: Default::default(),
                log: Default::default(),
                restart: Default::default(),
                on_exit: call.on_exit.clone(),
                grace: spindle_types::spec::DEFAULT_GRACE,
                stop_signal: Default::default(),
                max_memory: None,
                transient: !matches!(call.on_exit, spindle_types::OnExit::Restart),
                parent: Some(call.parent.process.clone()),
                budgets: Default::default(),
                network: false,
            };
            spec.check().map_err(|b| SpawnError::Spec {
                key: b.key,
                message: b.message,
            })?;
            crate::budget::admit(
                &self.kernel,
                &call.parent.node,
                &call.parent.process,
                self.wasm.live_runs(),
                self.wasm.pool() as usize,
            )
            .map_err(|e| SpawnError::Budget(e.to_string()))?;
            self.wasm
                .prepare(&found)
                .map_err(|e| SpawnError::Refused(e.to_string()))?;
            self.check_address(&spec, &HashSet::new())
                .map_err(SpawnError::Refused)?;
            let num = self
                .kernel
                .start(spec, Instant::now())
                .map_err(|_| SpawnError::ShuttingDown)?;
            self.apply();
            let child = self
                .procs
                .get(&num)
                .and_then(Attached::wasm)
                .cloned()
                .ok_or_else(|| {
                    SpawnError::Refused(format!(
                        "the child did not start: see `spindle ls` (id {num})"
                    ))
                })?;
            let bus = self.wasm.bus();
            let talk = spindle_bus::Capability::messaging(&child);
            bus.grant(&call.parent.process, [talk.clone()]);
            for g in &call.grant_to {
                bus.grant(&g.process, [talk.clone()]);
            }
            bus.grant(&child.process, call.capabilities.iter().cloned());
            Ok(child)
        })();
        self.wasm.unprepare();
        let _ = call.reply.send(answer);
    }
}
