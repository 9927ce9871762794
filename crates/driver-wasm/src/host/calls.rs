//! The `spindle:process/host` imports, one method each.

use super::*;
use crate::bindings::spindle::process::host;

impl wit::Host for ProcessHost {}

impl host::Host for ProcessHost {
    fn our(&mut self) -> Result<wit::Address, TrapError> {
        Ok(to_wit_addr(&self.our))
    }

    async fn receive(&mut self) -> Result<Received, TrapError> {
        self.mark_ready();
        loop {
            self.check_alive()?;
            if let Some(r) = self.poll_now(false) {
                return Ok(r);
            }
            let deadline = self.next_deadline();
            match self.wake(deadline).await {
                Wake::Killed => return Err(killed()),
                Wake::Mail(env) => {
                    if let Some(r) = self.accept(env) {
                        return Ok(r);
                    }
                }
                Wake::Deadline => {}
            }
        }
    }

    fn try_receive(&mut self) -> Result<Option<Received>, TrapError> {
        self.mark_ready();
        self.check_alive()?;
        let r = self.poll_now(true);
        self.check_alive()?;
        Ok(r)
    }

    fn send_request(
        &mut self,
        target: wit::Address,
        request: wit::Request,
        context: Option<Vec<u8>>,
        blob: Option<wit::Blob>,
    ) -> Result<Result<(), wit::SendError>, TrapError> {
        self.check_alive()?;
        let Some(to) = self.target(&target) else {
            return Ok(Err(invalid_request(target, request, context)));
        };
        let request = match from_wit_request(request) {
            Ok(r) => r,
            Err(r) => return Ok(Err(invalid_request(target, r, context))),
        };
        let r = self.send(to, request, context, blob);
        Ok(r.map(|_| ()))
    }

    async fn send_and_await_response(
        &mut self,
        target: wit::Address,
        mut request: wit::Request,
        blob: Option<wit::Blob>,
    ) -> Result<Result<(wit::Address, wit::Message), wit::SendError>, TrapError> {
        self.check_alive()?;
        if request.expects_response.is_none() {
            request.expects_response = Some(DEFAULT_AWAIT.as_millis() as u64);
        }
        let Some(to) = self.target(&target) else {
            return Ok(Err(invalid_request(target, request, None)));
        };
        let request = match from_wit_request(request) {
            Ok(r) => r,
            Err(r) => return Ok(Err(invalid_request(target, r, None))),
        };
        let id = match self.send(to, request, None, blob) {
            Ok(Some(id)) => id,
            Ok(None) => unreachable!("a response is expected"),
            Err(e) => return Ok(Err(e)),
        };
        loop {
            // A response already waiting (a runtime module answers on the
            // sender's own task) is taken without a timer or a yield.
            let ready = match self.mailbox.try_recv() {
                Some(env) if !self.is_killed() => Wake::Mail(env),
                _ => {
                    let deadline = self.pending.get(&id).map(|p| p.deadline);
                    self.wake(deadline).await
                }
            };
            match ready {
                Wake::Killed => return Err(killed()),
                Wake::Mail(env) => {
                    if env.id == id && env.message.is_answer() {
                        if let Some(r) = self.accept(env) {
                            return Ok(r);
                        }
                    } else {
                        self.defer(env);
                    }
                }
                // The timer may have been set for an earlier request.
                Wake::Deadline => {
                    let due = self
                        .pending
                        .get(&id)
                        .is_some_and(|p| p.deadline <= Instant::now());
                    if due && let Some(p) = self.take_pending(&id) {
                        return Ok(Err(send_error(
                            SendErrorKind::Timeout,
                            &p.target,
                            Message::Request(p.request),
                            p.context,
                        )));
                    }
                }
            }
        }
    }

    fn send_response(
        &mut self,
        response: wit::Response,
        blob: Option<wit::Blob>,
    ) -> Result<Result<(), wit::SendError>, TrapError> {
        self.check_alive()?;
        let Some(capabilities) = from_wit_caps(&response.capabilities) else {
            return Ok(Err(wit::SendError {
                kind: wit::SendErrorKind::Invalid,
                target: to_wit_addr(&self.our),
                message: wit::Message::Response((response, None)),
                context: None,
            }));
        };
        let resp = Response {
            inherit: response.inherit,
            body: response.body,
            metadata: response.metadata,
            capabilities,
        };
        let Some(cur) = self.handling.as_mut() else {
            let me = self.our.clone();
            return Ok(Err(send_error(
                SendErrorKind::Invalid,
                &me,
                Message::Response(resp, None),
                None,
            )));
        };
        // Nobody awaits a response (or it was already sent): nothing to do.
        let Some(rsvp) = cur.rsvp.take() else {
            return Ok(Ok(()));
        };
        let blob = blob
            .map(|b| Arc::new(from_wit_blob(b)))
            .or_else(|| resp.inherit.then(|| cur.blob.clone()).flatten());
        let env = Envelope {
            id: cur.id,
            source: self.our.clone(),
            target: rsvp.clone(),
            rsvp: None,
            message: Message::Response(resp, None),
            blob,
        };
        match self.send_routed(env) {
            Ok(()) => Ok(Ok(())),
            Err((kind, env)) => Ok(Err(send_error(kind, &rsvp, env.message, None))),
        }
    }

    async fn wait_for_room(&mut self, target: Option<wit::Address>) -> Result<bool, TrapError> {
        self.check_alive()?;
        let target = match target {
            Some(t) => self.target(&t),
            None => self.handling.as_ref().and_then(|h| h.rsvp.clone()),
        };
        Ok(match target {
            Some(t) => self.shared.bus.wait_for_room(&t.process).await,
            None => false,
        })
    }

    fn has_blob(&mut self) -> Result<bool, TrapError> {
        Ok(self.last.as_ref().is_some_and(|l| l.blob.is_some()))
    }

    fn get_blob(&mut self) -> Result<Option<wit::Blob>, TrapError> {
        Ok(self
            .last
            .as_ref()
            .and_then(|l| l.blob.as_ref())
            .map(|b| wit::Blob {
                mime: b.mime.clone(),
                bytes: b.bytes.clone(),
            }))
    }

    async fn set_state(&mut self, bytes: Vec<u8>) -> Result<Result<(), String>, TrapError> {
        self.check_alive()?;
        if bytes.len() > MAX_STATE_BYTES {
            return Ok(Err(format!(
                "state of {} bytes is more than a process may keep ({MAX_STATE_BYTES}): keep large data in the kv or sqlite module",
                bytes.len()
            )));
        }
        let path = self.state_path();
        let shown = path.display().to_string();
        let r = tokio::task::spawn_blocking(move || spindle_store::write_durable(&path, &bytes))
            .await
            .map_err(|e| TrapError::msg(e.to_string()))?;
        Ok(r.map_err(|e| format!("cannot save state to {shown}: {e}")))
    }

    fn get_state(&mut self) -> Result<Option<Vec<u8>>, TrapError> {
        Ok(std::fs::read(self.state_path()).ok())
    }

    fn clear_state(&mut self) -> Result<Result<(), String>, TrapError> {
        let path = self.state_path();
        Ok(match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot clear state {}: {e}", path.display())),
        })
    }

    fn get_on_exit(&mut self) -> Result<wit::OnExit, TrapError> {
        Ok(self.on_exit.clone())
    }

    fn set_on_exit(&mut self, on_exit: wit::OnExit) -> Result<(), TrapError> {
        if let Some(why) = on_exit_over(&on_exit) {
            return Err(TrapError::msg(format!("set-on-exit refused: {why}")));
        }
        self.on_exit = on_exit;
        Ok(())
    }

    async fn spawn(
        &mut self,
        name: Option<String>,
        wasm_path: String,
        on_exit: wit::OnExit,
        request_capabilities: Vec<wit::Capability>,
        grant_to: Vec<wit::Address>,
        public: bool,
    ) -> Result<Result<wit::Address, String>, TrapError> {
        self.check_alive()?;
        if grant_to.len() > MAX_SPAWN_GRANTS {
            return Ok(Err(format!(
                "grant-to names {} processes: at most {MAX_SPAWN_GRANTS}",
                grant_to.len()
            )));
        }
        if let Some(why) = on_exit_over(&on_exit) {
            return Ok(Err(format!("the child's on-exit: {why}")));
        }
        let Some(caps) = from_wit_caps(&request_capabilities) else {
            return Ok(Err(
                "a capability to give the child names an issuer that is not an address (node@process:package:publisher)".into(),
            ));
        };
        let mut grantees = Vec::with_capacity(grant_to.len());
        for g in &grant_to {
            match from_wit_addr(g) {
                Some(a) => grantees.push(a),
                None => {
                    return Ok(Err(format!(
                        "grant-to `{}` is not an address (node@process:package:publisher)",
                        spindle_types::id::shown(g)
                    )));
                }
            }
        }
        if let Some(c) = caps
            .iter()
            .find(|c| !self.shared.bus.may_attach(&self.our, c))
        {
            return Ok(Err(format!(
                "cannot give the child a capability this process does not hold: issuer {}, params {}",
                c.issuer,
                spindle_types::id::shown(&c.params)
            )));
        }
        let (reply, answer) = oneshot::channel();
        let mut call = crate::SpawnCall {
            parent: (*self.our).clone(),
            name,
            dir: self.component_dir.clone(),
            component: wasm_path,
            resolved: None,
            on_exit: crate::driver::on_exit_from_wit(&on_exit),
            public,
            capabilities: caps,
            grant_to: grantees,
            reply,
        };
        // Resolved once, here; a component already loaded goes straight to
        // the loop, one to compile waits for it in the stage before.
        let queue = match &call.resolve_once() {
            Ok(found) if !self.shared.loader.is_found_ready(found) => &self.shared.spawns,
            _ => &self.shared.to_loop,
        };
        if queue.send(call).await.is_err() {
            return Ok(Err("the node is shutting down".into()));
        }
        let child = match answer.await {
            Ok(Ok(child)) => child,
            Ok(Err(why)) => return Ok(Err(why.to_string())),
            Err(_) => return Ok(Err("the node is shutting down".into())),
        };
        // The child's row and capabilities land in the journal's next group
        // commit; the parent runs ahead of the disk only within its window.
        if let Err(why) = self.shared.bus.persisted_within_window().await {
            self.log_line(&format!("spindle: capabilities not saved: {why}"));
        }
        Ok(Ok(to_wit_addr(&child)))
    }

    fn our_capabilities(&mut self) -> Result<Vec<wit::Capability>, TrapError> {
        Ok(self
            .shared
            .bus
            .capabilities(&self.our.process)
            .iter()
            .map(to_wit_cap)
            .collect())
    }

    async fn save_capabilities(&mut self, caps: Vec<wit::Capability>) -> Result<(), TrapError> {
        // Only what actually arrived with the last message can be kept.
        let arrived = self.last.as_ref().map(|l| l.caps.as_slice()).unwrap_or(&[]);
        let keep: Vec<Capability> = from_wit_caps(&caps)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| arrived.contains(c))
            .collect();
        self.shared.bus.grant(&self.our.process, keep);
        self.caps_persisted().await;
        Ok(())
    }

    async fn drop_capabilities(&mut self, caps: Vec<wit::Capability>) -> Result<(), TrapError> {
        // Malformed ones cannot be held, so there is nothing to drop for them.
        let caps: Vec<Capability> = caps
            .iter()
            .filter_map(|c| from_wit_caps(std::slice::from_ref(c)))
            .flatten()
            .collect();
        self.shared.bus.revoke(&self.our.process, &caps);
        self.caps_persisted().await;
        Ok(())
    }

    fn print(&mut self, text: String) -> Result<(), TrapError> {
        self.log_line(&text);
        Ok(())
    }

    fn report_panic(&mut self, message: String) -> Result<(), TrapError> {
        self.log_line(&format!("panic: {message}"));
        self.panic = Some(spindle_types::fault::cut(&message, MAX_PANIC_DETAIL));
        Ok(())
    }
}
