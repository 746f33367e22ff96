//! Drives one `aggregate` job at this node: offer, start, shares, partial sum, report.
//!
//! The protocol (`cleanroom_circuits::aggregate`) in the order this module runs it:
//!
//! 1. **Offer.** The node decides against its agreements with *every* other party
//!    ([`crate::policy::aggregate`], through [`NodeState::decide`], which audits the decision and
//!    checks the node-wide ε budget). If it accepts, it registers one expected data-plane
//!    connection per peer *before* answering, so no peer can dial before it is expected.
//! 2. **Start** names every peer with its data-plane address; they must be exactly the spec's
//!    other parties.
//! 3. **Seeds.** Draw one fresh 32-byte seed per peer (independent of our data), dial every
//!    peer (its certificate must name it) and send an `AggregateHello` with the spec digest, our
//!    terms and its seed; receive one from every peer on the connection it dials to us (the
//!    data plane routes it here only if its certificate names that peer). This runs while we
//!    load, so a slow loader never makes its peers' waits time out.
//! 4. **Load** the dataset's group and value columns (consent and deletion filters apply), clip
//!    each value to the agreements' bounds and build the `groups × (1 + sums)` vector (count
//!    first); audited as an Access. With per-person clipping (the spec names a person column,
//!    as every agreement requires), a person's rows in the group of its first row are summed,
//!    then clipped, and the person counted once. Our kept share is the vector minus the peers'
//!    expanded seeds.
//! 5. **Partial.** Apply the strictest terms of all parties (smallest ε, most colluders, largest
//!    k-threshold, largest sensitivities), add our kept share, the peers' expanded seeds and our
//!    noise share, audit the Release and stream the partial to the coordinator in batches, then
//!    the `AggregateOutcome`: public terms, the audit head and byte counts only. Our rows read,
//!    excluded, rejected and counted in "(other)" are our own figures (with one group, rows read
//!    minus the rest is our exact count): they stay in the audit log's Access entry.
//!
//! A peer that does not connect, sends a wrong hello or goes away fails the job here, and the
//! coordinator fails it everywhere: it reconstructs only from all N partials. If the coordinator
//! drops the job's stream (another party failed), the job stops at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cleanroom_circuits::aggregate::{self, NoisePlan, ShareSeed, check_no_overflow, encode_cells};
use cleanroom_proto::v1::{
    AggregateHello, AggregateOutcome, AggregatePartial, AggregateTerms, ColumnNoise, Envelope,
    JobSpec, OfferReply, Phase, Ready, Report, envelope::Body, report::Outcome,
};
use cleanroom_transport::{FramedRecv, FramedSend, Identity};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::audit::{AuditEvent, AuditHead};
use crate::clock::now_ms;
use crate::data::aggregate_input::{Loaded, load_vector};
use crate::data::dataset::RowFilter;
use crate::data::forget::ForgetStore;
use crate::dataplane::{Delivery, pending_key, refused};
use crate::error::{JobError, NodeError, Timeout};
use crate::policy::Veto;
use crate::policy::aggregate::{self as aggregate_policy, AggregatePermit};
use crate::state::NodeState;

/// How long the node waits for `Start` after accepting.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a peer has to connect and send its hello.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound on one job.
const JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// Cells per partial batch: 512 KiB, well under the 1 MiB frame cap.
pub const PARTIAL_BATCH_CELLS: usize = 1 << 16;
/// The label of the group that collects rows whose label the spec does not list (or whose
/// integer is outside the spec's range).
pub const OTHER_GROUP: &str = aggregate::OTHER_GROUP;
/// QUIC close codes for the data-plane connections.
const CLOSE_DONE: u32 = 0;
const CLOSE_FAILED: u32 = 3;

/// Serves an aggregate offer on the job's control stream, to the end of the job. Errors are
/// reported and audited by the caller (the control session).
pub async fn serve_offer(
    endpoint: quinn::Endpoint,
    state: &Arc<NodeState>,
    job_id: String,
    spec: JobSpec,
    send: &mut FramedSend,
    recv: &mut FramedRecv,
) -> Result<(), NodeError> {
    let reply = |accept: bool, reason: String| Envelope {
        job_id: job_id.clone(),
        phase: Phase::Offer as i32,
        body: Some(Body::OfferReply(OfferReply {
            accept,
            reason,
            signed_head: state.signed_head(),
        })),
    };
    let my_name = state.cfg().name.clone();
    let Some(me) = aggregate_policy::my_index(&spec, &my_name) else {
        let reason = format!("node '{my_name}' is not a party of this aggregate (exactly once)");
        send.send(&reply(false, reason)).await?;
        return Ok(());
    };
    let (generation, permit) = match state.decide(&job_id, &spec, me, now_ms()) {
        Ok(d) => d,
        Err(veto) => {
            tracing::info!(reason = %veto, "offer vetoed");
            send.send(&reply(false, veto.to_string())).await?;
            return Ok(());
        }
    };
    // The full terms (peers, group column, colluders), from the same policy generation.
    let terms = aggregate_policy::check_offer_at(&state.cfg(), &spec, me, now_ms())
        .map_err(|v| NodeError::from(JobError::Refused(v)))?;
    if terms.permit != permit {
        return Err(JobError::PolicyChangedDuringOffer.into());
    }
    let mut incoming = Vec::new();
    for peer in &terms.peers {
        incoming.push((
            peer.clone(),
            state
                .waiting
                .expect_connection(&pending_key(&job_id, peer), peer),
        ));
    }
    let job = AggregateJob {
        job_id: job_id.clone(),
        spec,
        terms,
        generation,
        state: state.clone(),
    };
    let result = async {
        tracing::info!(partner = %job.terms.permit.partner, purpose = %job.spec.purpose, "aggregate offer accepted");
        send.send(&reply(true, String::new())).await?;
        let peers = job.await_start(&endpoint, recv).await?;
        let Some(peers) = peers else {
            tracing::info!("job withdrawn by the coordinator before it started");
            return Ok(());
        };
        send.send(&Envelope {
            job_id: job_id.clone(),
            phase: Phase::Start as i32,
            body: Some(Body::Ready(Ready {})),
        })
        .await?;
        // The job runs until done, its deadline, or the coordinator dropping the stream.
        let run = tokio::time::timeout(JOB_TIMEOUT, job.run(&endpoint, peers, incoming, send));
        tokio::select! {
            r = run => r.unwrap_or_else(|_| Err(Timeout::Job.into())),
            _ = wait_for_withdrawal(recv) => Err(JobError::Withdrawn.into()),
        }
    }
    .await;
    for peer in &job.terms.peers {
        state.waiting.forget_pending(&pending_key(&job_id, peer));
    }
    result
}

/// Resolves when the coordinator's side of the job stream ends or sends anything (it sends
/// nothing after Start).
async fn wait_for_withdrawal(recv: &mut FramedRecv) {
    let _ = recv.recv().await;
}

/// One accepted aggregate job.
#[derive(Debug)]
struct AggregateJob {
    job_id: String,
    spec: JobSpec,
    terms: AggregatePermit,
    generation: u64,
    state: Arc<NodeState>,
}

/// What a peer sent us.
struct PeerShare {
    seed: ShareSeed,
    terms: AggregateTerms,
}

/// The terms every party applies: the strictest of all parties' terms.
#[derive(Debug, Clone, PartialEq)]
struct JointTerms {
    epsilon: Option<f64>,
    max_colluders: u32,
    min_result: u64,
    sensitivities: Vec<u64>,
}

impl AggregateJob {
    fn my_name(&self) -> String {
        self.state.cfg().name.clone()
    }

    /// Waits for Start and checks that it names exactly our peers. `None`: withdrawn.
    async fn await_start(
        &self,
        endpoint: &quinn::Endpoint,
        recv: &mut FramedRecv,
    ) -> Result<Option<Vec<(String, SocketAddr)>>, NodeError> {
        let start = match tokio::time::timeout(START_TIMEOUT, recv.recv()).await {
            Err(_) => {
                return Err(Timeout::NoStart.into());
            }
            Ok(Ok(None)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(Some(e))) => e,
        };
        cleanroom_proto::frame::check_envelope(&start, &self.job_id, Phase::Start)
            .map_err(|e| protocol("coordinator", e))?;
        let Some(Body::Start(start)) = start.body else {
            return Err(protocol("coordinator", "expected Start"));
        };
        let mut addrs: HashMap<&str, &str> = HashMap::new();
        for p in &start.peers {
            if addrs.insert(&p.node, &p.data_addr).is_some() {
                return Err(protocol("coordinator", "Start names a peer twice"));
            }
        }
        if addrs.len() != self.terms.peers.len() {
            return Err(protocol(
                "coordinator",
                "Start does not name exactly the job's other parties",
            ));
        }
        let mut peers = Vec::new();
        for peer in &self.terms.peers {
            let Some(addr) = addrs.get(peer.as_str()) else {
                return Err(protocol(
                    "coordinator",
                    format!("Start gives no address for party '{peer}'"),
                ));
            };
            let addr = crate::dataplane::resolve_peer(endpoint, addr).await?;
            peers.push((peer.clone(), addr));
        }
        Ok(Some(peers))
    }

    /// Appends to the audit log; what cannot be audited does not happen.
    fn audit(&self, event: AuditEvent) -> Result<AuditHead, NodeError> {
        self.state.audit.append(event, now_ms()).map_err(|e| {
            tracing::error!(error = %e, "audit log write failed; stopping the job");
            NodeError::from(JobError::Audit {
                node: self.my_name().to_owned(),
            })
        })
    }

    /// This node's noise share for every cell. When the joint terms ask for noise and our
    /// agreements set ε, the release's zCDP ρ (what the honest parties' noise gives, KLS21:
    /// `ρ = Σ_c ε_c²/2`) is charged to the ledger in the transaction that draws the noise, under
    /// the key `aggregate:<spec digest>`; the draw is not kept, and a job whose release was
    /// charged before is refused. Exact runs charge nothing.
    async fn charge_noise(
        &self,
        plan: &NoisePlan,
        joint: &JointTerms,
        groups: usize,
    ) -> Result<(Vec<i64>, f64), NodeError> {
        let cfg = self.state.cfg();
        let charge = if plan.is_noised() {
            self.terms.permit.charge(&self.job_id, &cfg)
        } else {
            None
        };
        let plan = plan.clone();
        let Some(mut charge) = charge else {
            return blocking(move || plan.draw(groups))
                .await?
                .map(|noise| (noise, 0.0))
                .map_err(|e| compute("noise", e));
        };
        let rho = release_rho(&plan, &joint.sensitivities);
        charge.loss = crate::ledger::Loss::Rho(rho);
        let key = crate::spec::release_key(&self.job_id, &self.spec);
        let state = self.state.clone();
        let drawn = blocking(move || {
            state
                .ledger
                .charge_and_draw(&key, &charge, now_ms(), || plan.draw(groups))
        })
        .await?
        .map_err(|e| NodeError::from(JobError::Refused(crate::state::budget_veto(&cfg.name, e))))?;
        tracing::info!(rho, "privacy budget charged for an aggregate (zCDP)");
        Ok((drawn, rho))
    }

    fn recheck(&self) -> Result<(), NodeError> {
        self.state
            .recheck(
                self.generation,
                &self.spec,
                self.terms.me,
                &self.terms.permit,
                now_ms(),
            )
            .map_err(|v| NodeError::from(JobError::Refused(v)))
    }

    /// Column names in vector order: the count, then the sums.
    fn columns(&self) -> Vec<String> {
        let mut c = vec!["count".to_owned()];
        c.extend(
            self.terms
                .permit
                .value_columns
                .iter()
                .map(|v| v.column.get_ref().clone()),
        );
        c
    }

    /// Our terms as we send them to every peer.
    fn own_terms(&self) -> AggregateTerms {
        let mut sensitivities = vec![1u64];
        sensitivities.extend(
            self.terms
                .permit
                .value_columns
                .iter()
                .map(|v| v.min.unsigned_abs().max(v.max.unsigned_abs()).max(1)),
        );
        AggregateTerms {
            epsilon: self.terms.permit.epsilon.map_or(0.0, |e| e.get()),
            max_colluders: self.terms.max_colluders,
            min_result: self.terms.permit.min_result,
            sensitivities,
        }
    }

    async fn run(
        &self,
        endpoint: &quinn::Endpoint,
        peers: Vec<(String, SocketAddr)>,
        incoming: Vec<(String, oneshot::Receiver<Delivery>)>,
        control: &mut FramedSend,
    ) -> Result<(), NodeError> {
        self.recheck()?;
        let n = self.spec.parties.len();
        let digest = crate::spec::spec_digest(&self.job_id, &self.spec);
        let my_terms = self.own_terms();

        // The seeds of the peers' shares do not depend on our data, so they go out first: the
        // exchange is over within a round trip of Start, and a peer whose dataset loads slowly
        // cannot make the others' data-plane waits time out. Only the share we keep is computed
        // from the data, after loading.
        let seeds = (1..n)
            .map(|_| ShareSeed::generate())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| compute("secret sharing", e))?;
        let mut sends = tokio::task::JoinSet::new();
        let mut bytes_to_peers = 0u64;
        for ((peer, addr), seed) in peers.into_iter().zip(&seeds) {
            let hello = Envelope {
                job_id: self.job_id.clone(),
                phase: Phase::AggShare as i32,
                body: Some(Body::AggHello(AggregateHello {
                    sender: self.my_name(),
                    spec_digest: digest.to_vec(),
                    terms: Some(my_terms.clone()),
                    share_seed: seed.to_bytes(),
                })),
            };
            bytes_to_peers += framed_len(&hello);
            let endpoint = endpoint.clone();
            sends.spawn(async move { send_share(endpoint, peer, addr, hello).await });
        }
        let mut receives = tokio::task::JoinSet::new();
        for (peer, rx) in incoming {
            let job_id = self.job_id.clone();
            let digest = digest.to_vec();
            receives.spawn(async move { receive_share(job_id, peer, rx, digest).await });
        }

        let loaded = self.load().await?;
        check_no_overflow(
            loaded.rows_used,
            my_terms.sensitivities.iter().copied().max().unwrap_or(1),
            n,
        )
        .map_err(|e| NodeError::from(JobError::Refused(Veto(e.to_string()))))?;
        self.terms
            .permit
            .check_input_size(loaded.rows_used)
            .map_err(|v| NodeError::from(JobError::Refused(v)))?;
        let vector = loaded.vector;
        let cells = vector.cells().len();
        let groups = vector.groups();
        let own = blocking(move || aggregate::split_with_seeds(&vector, seeds).own).await?;

        let mut shares: Vec<(String, PeerShare, quinn::Connection)> = Vec::new();
        while let Some(r) = receives.join_next().await {
            match r {
                Ok(Ok(s)) => shares.push(s),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(JobError::Internal(e.to_string()).into()),
            }
        }
        // Kept open until we have reported, so no frame of ours or theirs is cut off.
        let mut out_conns: Vec<(quinn::Connection, FramedSend)> = Vec::new();
        while let Some(r) = sends.join_next().await {
            match r {
                Ok(Ok(c)) => out_conns.push(c),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(JobError::Internal(e.to_string()).into()),
            }
        }

        // Each peer's terms decide our noise and threshold: they must be terms an honest node
        // can send, or the peer is named as the one that broke the protocol.
        for (peer, share, _) in &shares {
            check_peer_terms(&share.terms, n, my_terms.sensitivities.len())
                .map_err(|e| protocol(peer, e))?;
        }
        // The strictest terms of all parties, identical at every honest party.
        let all_terms: Vec<&AggregateTerms> = std::iter::once(&my_terms)
            .chain(shares.iter().map(|(_, s, _)| &s.terms))
            .collect();
        let joint =
            joint_terms(&all_terms, n).map_err(|e| compute("the parties' terms do not fit", e))?;
        let plan = match joint.epsilon {
            Some(eps) => NoisePlan::new(eps, &joint.sensitivities, n, joint.max_colluders as usize),
            None => Ok(NoisePlan::none(joint.sensitivities.len(), n)),
        }
        .map_err(|e| compute("noise", e))?;

        let mut in_conns = Vec::new();
        let mut seeds: Vec<ShareSeed> = Vec::new();
        for (_, share, conn) in shares {
            seeds.push(share.seed);
            in_conns.push(conn);
        }
        let (noise, rho) = self.charge_noise(&plan, &joint, groups).await?;
        let partial = blocking(move || -> Result<Vec<u64>, aggregate::AggregateError> {
            let mut acc = own;
            for seed in &seeds {
                aggregate::accumulate_seed(&mut acc, seed);
            }
            aggregate::add_noise(&mut acc, &noise)?;
            Ok(acc)
        })
        .await?
        .map_err(|e| compute("partial sum", e))?;

        self.recheck()?;
        let epsilon_spent = if plan.is_noised() {
            self.terms.permit.epsilon.map_or(0.0, |e| e.get())
        } else {
            0.0
        };
        let head = self.audit(AuditEvent::Release {
            job_id: self.job_id.clone(),
            partner: self.terms.permit.partner.clone(),
            what: format!(
                "aggregate partial sum of {} groups × {} columns (masked; only the sum of all {n} \
                 partials is meaningful){}",
                groups,
                joint.sensitivities.len(),
                if !plan.is_noised() {
                    ", no noise (no agreement asks for it)".to_owned()
                } else if rho > 0.0 {
                    let delta = self.state.cfg().delta();
                    format!(
                        ", with this node's share of discrete Gaussian noise: zCDP rho {} \
                         charged (epsilon {} at delta {delta:e} on its own){}",
                        crate::ledger::show(rho),
                        crate::ledger::show(crate::ledger::epsilon_at(0.0, rho, delta)),
                        if self.terms.person.is_some() {
                            ", per person"
                        } else {
                            ", per row"
                        }
                    )
                } else {
                    ", with this node's share of discrete Gaussian noise (its agreements set no \
                     epsilon: nothing charged)"
                        .to_owned()
                }
            ),
            to: vec!["coordinator".into()],
            value: None,
            epsilon: epsilon_spent,
            rho: (rho > 0.0).then_some(rho),
        })?;

        let mut bytes_to_coordinator = 0u64;
        for (seq, batch) in (0u64..).zip(partial.chunks(PARTIAL_BATCH_CELLS)) {
            let frame = Envelope {
                job_id: self.job_id.clone(),
                phase: Phase::AggPartial as i32,
                body: Some(Body::AggPartial(AggregatePartial {
                    seq,
                    cells: encode_cells(batch),
                })),
            };
            bytes_to_coordinator += framed_len(&frame);
            control.send(&frame).await?;
        }
        let noise = describe_noise(&plan, &joint, &self.columns());
        let outcome = AggregateOutcome {
            cells: cells as u64,
            terms_digest: terms_digest(&digest, &joint).to_vec(),
            noise,
            min_result: joint.min_result,
            max_colluders: joint.max_colluders,
            audit_head: head.to_string(),
            bytes_to_peers,
            bytes_to_coordinator,
        };
        control
            .send(&Envelope {
                job_id: self.job_id.clone(),
                phase: Phase::Report as i32,
                body: Some(Body::Report(Report {
                    outcome: Some(Outcome::Aggregate(outcome)),
                    signed_head: self.state.signed_head(),
                })),
            })
            .await?;
        tracing::info!(groups, cells, "aggregate partial reported");
        for (conn, mut send) in out_conns {
            // The peer has long read our hello (it could not have reported otherwise); wait
            // briefly for the acknowledgement so closing cannot race it.
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            conn.close(CLOSE_DONE.into(), b"done");
        }
        drop(in_conns);
        Ok(())
    }

    /// Reads the dataset into the clipped per-group vector.
    async fn load(&self) -> Result<Loaded, NodeError> {
        let dataset = self.terms.permit.dataset.clone();
        let forgotten = {
            let store = ForgetStore::open(&self.state.cfg().state_dir)
                .map_err(|e| NodeError::from(JobError::DeletionList(e.to_string())))?;
            store
                .load(&dataset.name)
                .map_err(|e| NodeError::from(JobError::DeletionList(e.to_string())))?
        };
        let consent = self.terms.permit.consent_column.clone();
        let group_by = self.terms.group_by.clone();
        let bounds: Vec<(String, i64, i64)> = self
            .terms
            .permit
            .value_columns
            .iter()
            .map(|v| (v.column.get_ref().clone(), v.min, v.max))
            .collect();
        let domain = self.terms.domain.clone();
        let person = self.terms.person.clone();
        let ds = dataset.clone();
        let loaded = blocking(move || {
            load_vector(
                &ds,
                &group_by,
                &domain,
                &bounds,
                person.as_deref(),
                RowFilter {
                    consent_column: consent.as_deref(),
                    forgotten: Some(&forgotten),
                },
            )
        })
        .await?
        .map_err(|e| match e {
            crate::data::aggregate_input::AggregateInputError::Vector(reason) => {
                NodeError::from(JobError::Refused(Veto(reason)))
            }
            other => JobError::Rows(other.to_string()).into(),
        })?;
        let mut columns = vec![self.terms.group_by.clone()];
        columns.extend(self.columns().into_iter().skip(1));
        columns.extend(self.terms.person.clone());
        self.audit(AuditEvent::Access {
            job_id: self.job_id.clone(),
            dataset: dataset.name.clone(),
            columns,
            rows_read: loaded.counts.rows_read,
            rows_rejected: loaded.rows_rejected,
            rows_excluded_consent: loaded.counts.rows_excluded_consent,
            rows_excluded_deleted: loaded.counts.rows_excluded_deleted,
            rows_other: Some(loaded.rows_other),
            persons: loaded.persons,
        })?;
        Ok(loaded)
    }
}

/// The zCDP ρ of a noised aggregate release: what the honest parties' noise gives each column
/// (KLS21's `ε_c`, as reported in the result), composed: `ρ = Σ_c ε_c² / 2`.
fn release_rho(plan: &NoisePlan, sensitivities: &[u64]) -> f64 {
    let e = aggregate::composed_epsilon(&plan.describe(sensitivities));
    e * e / 2.0
}

/// Checks terms a peer sent against what an honest node sends: ε finite and ≥ 0 (0 = no
/// noise), fewer colluders than parties, one sensitivity per column of the job, each ≥ 1 and
/// no larger than an `i64` clipping bound allows. (A huge ε or `min_result` needs no check: the
/// joint terms take the smallest ε and the largest threshold, so they only make the release
/// more private.)
fn check_peer_terms(terms: &AggregateTerms, parties: usize, columns: usize) -> Result<(), String> {
    if !terms.epsilon.is_finite() || terms.epsilon < 0.0 {
        return Err(format!(
            "hello declares epsilon {}, not a finite number >= 0",
            terms.epsilon
        ));
    }
    if terms.max_colluders as usize >= parties {
        return Err(format!(
            "hello declares {} colluders among {parties} parties",
            terms.max_colluders
        ));
    }
    if terms.sensitivities.len() != columns {
        return Err(format!(
            "hello declares {} column sensitivities for a job of {columns} columns",
            terms.sensitivities.len()
        ));
    }
    if let Some(s) = terms.sensitivities.iter().find(|&&s| s == 0 || s > 1 << 63) {
        return Err(format!("hello declares a column sensitivity of {s}"));
    }
    Ok(())
}

/// The strictest of all parties' terms: smallest positive ε (none if no party asks for
/// noise), most colluders (clamped below `n`), largest k-threshold, largest sensitivity per
/// column. Every party must send one sensitivity per column.
fn joint_terms(all: &[&AggregateTerms], n: usize) -> Result<JointTerms, String> {
    let columns = all.first().map_or(0, |t| t.sensitivities.len());
    if all.iter().any(|t| t.sensitivities.len() != columns) {
        return Err("parties declare different numbers of columns".into());
    }
    if all
        .iter()
        .any(|t| !t.epsilon.is_finite() || t.epsilon < 0.0)
    {
        return Err("a party declares an invalid epsilon".into());
    }
    let epsilon = all
        .iter()
        .map(|t| t.epsilon)
        .filter(|e| *e > 0.0)
        .min_by(f64::total_cmp);
    let sensitivities = (0..columns)
        .map(|c| {
            all.iter()
                .map(|t| t.sensitivities[c])
                .max()
                .unwrap_or(1)
                .max(1)
        })
        .collect();
    Ok(JointTerms {
        epsilon,
        max_colluders: all
            .iter()
            .map(|t| t.max_colluders)
            .max()
            .unwrap_or(0)
            .min(n.saturating_sub(1) as u32),
        min_result: all.iter().map(|t| t.min_result).max().unwrap_or(1),
        sensitivities,
    })
}

/// A digest of the spec and the joint terms: equal at every party of an honest run, so the
/// coordinator can tell that all partials were built under the same terms.
fn terms_digest(spec_digest: &[u8], joint: &JointTerms) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"cleanroom/1 aggregate terms\0");
    h.update(spec_digest);
    h.update(joint.epsilon.unwrap_or(0.0).to_bits().to_le_bytes());
    h.update(joint.max_colluders.to_le_bytes());
    h.update(joint.min_result.to_le_bytes());
    for s in &joint.sensitivities {
        h.update(s.to_le_bytes());
    }
    h.finalize().into()
}

fn describe_noise(plan: &NoisePlan, joint: &JointTerms, columns: &[String]) -> Vec<ColumnNoise> {
    plan.describe(&joint.sensitivities)
        .into_iter()
        .zip(columns)
        .zip(&joint.sensitivities)
        .map(|((d, name), &sensitivity)| match d {
            Some(d) => ColumnNoise {
                column: name.clone(),
                noised: true,
                share_sigma: d.share_sigma,
                total_sd: d.total_sd,
                zcdp_epsilon: d.zcdp_epsilon,
                sensitivity,
            },
            None => ColumnNoise {
                column: name.clone(),
                noised: false,
                sensitivity,
                ..ColumnNoise::default()
            },
        })
        .collect()
}

/// Bytes an envelope takes on the wire (length prefix included).
fn framed_len(envelope: &Envelope) -> u64 {
    use prost::Message;
    (envelope.encoded_len() + cleanroom_proto::frame::LEN_PREFIX) as u64
}

/// Dials `peer` and sends it its share's seed; returns the connection and the finished stream
/// (closed when the job ends, so the frame is not cut off). Delivery is confirmed by the peer
/// itself: it cannot compute its partial without our hello.
async fn send_share(
    endpoint: quinn::Endpoint,
    peer: String,
    addr: SocketAddr,
    hello: Envelope,
) -> Result<(quinn::Connection, FramedSend), NodeError> {
    let identity = Identity::node(&peer)?;
    let conn = cleanroom_transport::connect(&endpoint, addr, &identity)
        .await
        .map_err(|e| data_plane(format!("cannot reach party '{peer}'"), e))?;
    let stream = conn
        .open_uni()
        .await
        .map_err(|e| data_plane(format!("data plane to '{peer}'"), e))?;
    let mut send = FramedSend::new(stream);
    send.send(&hello)
        .await
        .map_err(|e| data_plane(format!("sending the share to '{peer}'"), e))?;
    send.finish()?;
    Ok((conn, send))
}

/// Waits for `peer`'s connection (routed here by the data plane only if the peer's
/// certificate names it) and checks its hello.
async fn receive_share(
    job_id: String,
    peer: String,
    rx: oneshot::Receiver<Delivery>,
    digest: Vec<u8>,
) -> Result<(String, PeerShare, quinn::Connection), NodeError> {
    let handover = tokio::time::timeout(PEER_TIMEOUT, rx)
        .await
        .map_err(|_| NodeError::from(Timeout::PartyDidNotConnect(peer.to_owned())))?
        .map_err(|_| {
            NodeError::from(JobError::Cancelled {
                waiting_for: "peers",
            })
        })?
        .map_err(|reason| refused(&peer, &reason))?;
    let conn = handover.conn;
    let fail = |reason: String| {
        conn.close(CLOSE_FAILED.into(), reason.as_bytes());
        protocol(&peer, reason)
    };
    let share = check_hello(&job_id, &peer, &digest, handover.hello).map_err(fail)?;
    // The hello is all the peer sends: read its stream to the end (which also lets the peer
    // know it was delivered).
    let mut recv = handover.recv;
    match tokio::time::timeout(PEER_TIMEOUT, recv.recv()).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(_))) => return Err(fail("sent more than its hello".into())),
        Ok(Err(e)) => return Err(fail(format!("broken share stream: {e}"))),
        Err(_) => return Err(fail("did not end its share stream".into())),
    }
    Ok((peer, share, conn))
}

/// Checks a peer's `AggregateHello`: this job, the share phase, the sender it claims is the
/// certificate's, the same spec, a well-formed seed and terms.
fn check_hello(
    job_id: &str,
    peer: &str,
    digest: &[u8],
    hello: Envelope,
) -> Result<PeerShare, String> {
    cleanroom_proto::frame::check_envelope(&hello, job_id, Phase::AggShare)
        .map_err(|e| e.to_string())?;
    let Some(Body::AggHello(h)) = hello.body else {
        return Err("first frame is not an AggregateHello".into());
    };
    if h.sender != peer {
        return Err(format!(
            "hello claims to be from '{}' on a connection certified as '{peer}'",
            h.sender.escape_default()
        ));
    }
    if h.spec_digest != digest {
        return Err("the peer runs a different job spec".into());
    }
    let seed = ShareSeed::decode(&h.share_seed).map_err(|e| e.to_string())?;
    let terms = h.terms.ok_or("hello without terms")?;
    if terms.sensitivities.len() > 1 + cleanroom_circuits::aggregate::MAX_CELLS {
        return Err("hello declares too many columns".into());
    }
    Ok(PeerShare { seed, terms })
}

fn protocol(peer: &str, reason: impl std::fmt::Display) -> NodeError {
    NodeError::Protocol {
        peer: peer.to_owned(),
        reason: reason.to_string(),
    }
}

/// Runs CPU work on the blocking pool, turning a panic into a job error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobError::Internal(e.to_string()).into())
}

/// A local computation's failure, named by its step.
fn compute(step: &'static str, e: impl std::fmt::Display) -> NodeError {
    JobError::Compute {
        step,
        reason: e.to_string(),
    }
    .into()
}

/// A peer that could not be reached, or its stream not used (`what` says which step).
fn data_plane(what: String, e: impl std::fmt::Display) -> NodeError {
    JobError::DataPlane {
        what,
        reason: e.to_string(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    fn terms(eps: f64, t: u32, k: u64, s: &[u64]) -> AggregateTerms {
        AggregateTerms {
            epsilon: eps,
            max_colluders: t,
            min_result: k,
            sensitivities: s.to_vec(),
        }
    }

    #[test]
    fn joint_terms_are_the_strictest() {
        let a = terms(1.0, 1, 5, &[1, 100]);
        let b = terms(0.0, 2, 3, &[1, 500]);
        let c = terms(0.5, 0, 10, &[1, 50]);
        let j = joint_terms(&[&a, &b, &c], 3).unwrap();
        assert_eq!(j.epsilon, Some(0.5));
        assert_eq!(j.max_colluders, 2);
        assert_eq!(j.min_result, 10);
        assert_eq!(j.sensitivities, vec![1, 500]);
        // Nobody asks for noise: exact.
        let z = terms(0.0, 9, 1, &[1]);
        let j = joint_terms(&[&z, &z, &z], 3).unwrap();
        assert_eq!(j.epsilon, None);
        assert_eq!(j.max_colluders, 2, "clamped below the party count");
        assert!(joint_terms(&[&a, &z], 3).is_err());
        assert!(joint_terms(&[&terms(f64::NAN, 0, 1, &[1])], 3).is_err());
    }

    #[test]
    fn peer_terms_an_honest_node_cannot_send_are_named() {
        assert!(check_peer_terms(&terms(1.0, 2, 1, &[1, 200]), 3, 2).is_ok());
        assert!(check_peer_terms(&terms(0.0, 0, u64::MAX, &[1, 1 << 63]), 3, 2).is_ok());
        let e = |t: AggregateTerms| check_peer_terms(&t, 3, 2).unwrap_err();
        assert!(e(terms(f64::NAN, 0, 1, &[1, 1])).contains("epsilon NaN"));
        assert!(e(terms(-1.0, 0, 1, &[1, 1])).contains("epsilon -1"));
        assert!(e(terms(f64::INFINITY, 0, 1, &[1, 1])).contains("epsilon inf"));
        assert!(e(terms(1.0, 3, 1, &[1, 1])).contains("3 colluders among 3 parties"));
        assert!(e(terms(1.0, 0, 1, &[1])).contains("1 column sensitivities for a job of 2"));
        assert!(e(terms(1.0, 0, 1, &[1, 0])).contains("sensitivity of 0"));
        assert!(
            e(terms(1.0, 0, 1, &[1, u64::MAX])).contains("sensitivity of 18446744073709551615")
        );
    }

    #[test]
    fn hello_checks() {
        let digest = vec![1u8; 32];
        let hello = |sender: &str, d: &[u8], seed: Vec<u8>| Envelope {
            job_id: "job-1".into(),
            phase: Phase::AggShare as i32,
            body: Some(Body::AggHello(AggregateHello {
                sender: sender.into(),
                spec_digest: d.to_vec(),
                terms: Some(terms(1.0, 1, 1, &[1])),
                share_seed: seed,
            })),
        };
        assert!(
            check_hello(
                "job-1",
                "globex",
                &digest,
                hello("globex", &digest, vec![0; 32])
            )
            .is_ok()
        );
        let e = |env| check_hello("job-1", "globex", &digest, env).err().unwrap();
        assert!(e(hello("initech", &digest, vec![0; 32])).contains("certified as 'globex'"));
        assert!(e(hello("globex", &[2u8; 32], vec![0; 32])).contains("different job spec"));
        assert!(e(hello("globex", &digest, vec![0; 31])).contains("32 bytes"));
        let mut other_job = hello("globex", &digest, vec![0; 32]);
        other_job.job_id = "job-2".into();
        assert!(check_hello("job-1", "globex", &digest, other_job).is_err());
    }
}
