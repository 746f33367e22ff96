//! The checks that turn the config file as written ([`NodeConfig<AllowEntry>`]) into the typed
//! policy the node runs on: every rule of the file, and for each `[[agreement.allow]]` the
//! rules of its computation, which live beside that kind's offer check (`policy::psi`,
//! `policy::overlap_sum`, `policy::aggregate`). This file sits above them, so none of them
//! imports it.

use std::collections::HashSet;
use std::path::Path;

use crate::data::normalise::{Normaliser, parse_region};
use crate::data::{DataFormat, DatasetConfig};
use crate::ledger::{Budget, DEFAULT_DP_DELTA, Delta};

use super::allow::{Allow, AllowEntry};
use super::schema::{Agreement, ConfigError, NodeConfig};
use super::values::{Computation, check_name, line_of, run_cost};

impl NodeConfig {
    /// Reads, parses and validates the config file at `path`, resolving relative paths against
    /// its directory.
    pub fn load(path: impl AsRef<Path>) -> Result<NodeConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` as if it were read from `path` (which names the file in
    /// errors and anchors relative paths); nothing is read from disk.
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let mut file: NodeConfig<AllowEntry> =
            toml::from_str(text).map_err(|error| ConfigError::Parse {
                path: path.to_owned(),
                error,
            })?;
        // A composite key is written `email+phone` or `email,phone` (as on the command line);
        // it is kept, checked and printed as `email+phone`.
        for e in file.agreements.iter_mut().flat_map(|a| a.allow.iter_mut()) {
            for key in &mut e.keys {
                if key.contains(',') || key.contains(' ') {
                    *key = key
                        .split(['+', ','])
                        .map(str::trim)
                        .collect::<Vec<_>>()
                        .join("+");
                }
            }
        }
        let mut cfg = file.check(text).map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        cfg.resolve_paths(base);
        Ok(cfg)
    }
}

/// The smallest `memory_limit` accepted: the process, its runtime and one job's buffers.
pub const MIN_MEMORY_LIMIT: u64 = 128 << 20;

impl NodeConfig<AllowEntry> {
    /// Checks the file as written and types its allow entries: every rule of the file, and for
    /// each `[[agreement.allow]]` the rules of its computation ([`Allow::check`]).
    fn check(self, text: &str) -> Result<NodeConfig, String> {
        let file = self;
        if file
            .ledger
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("ledger is an empty path (omit it for <state_dir>/ledger.sqlite)".into());
        }
        if let Some(d) = &file.dashboard
            && !d.listen.ip().is_loopback()
            && !d.allow_non_loopback
        {
            return Err(format!(
                "[dashboard] listen = \"{}\" is not a loopback address: the dashboard is plain \
                 HTTP without authentication, so anyone who can reach it reads the node's \
                 agreements, budgets and decisions; listen on 127.0.0.1 and reach it through an \
                 SSH tunnel, or set allow_non_loopback = true behind a proxy that authenticates",
                d.listen
            ));
        }
        if let Some(limit) = file.memory_limit
            && limit.as_u64() < MIN_MEMORY_LIMIT
        {
            return Err(format!(
                "memory_limit = \"{limit}\" is below {}: the node itself needs about that much \
                 (raise it, or omit it for no bound)",
                bytesize::ByteSize(MIN_MEMORY_LIMIT)
            ));
        }
        if let Some(url) = &file.engine.ballista
            && !url
                .strip_prefix("df://")
                .is_some_and(|rest| rest.contains(':') && !rest.contains('/'))
        {
            return Err(format!(
                "engine: ballista = \"{url}\" is not a scheduler URL; write \"df://HOST:PORT\""
            ));
        }
        if file.engine.partitions == Some(0) || file.engine.partitions > Some(4096) {
            return Err("engine: partitions must be between 1 and 4096".into());
        }
        if file.engine.sealing_key.is_some() && file.engine.ballista.is_none() {
            return Err(
                "engine: sealing_key is only read with ballista = \"df://HOST:PORT\"".into(),
            );
        }
        if file.engine.shared_dir.is_some() && file.engine.sealing_key.is_none() {
            return Err(
                "engine: shared_dir is only read with a sealing_key (the executors open \
                 what the node asks them to compare there with it)"
                    .into(),
            );
        }
        if file
            .engine
            .shared_dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("engine: shared_dir is an empty path".into());
        }
        if file.engine.partitions.is_some() && file.engine.ballista.is_none() {
            return Err(
                "engine: partitions is only read with ballista = \"df://HOST:PORT\"".into(),
            );
        }
        if file
            .spill_dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("spill_dir is an empty path (omit it for <state_dir>/spill)".into());
        }
        if file.retention_days == Some(0) {
            return Err("retention_days must be at least 1 (omit it to keep results)".into());
        }
        if let Some(b) = &file.budget {
            b.validate("[budget]")?;
        }
        check_name("name", &file.name)?;
        let mut seen = HashSet::new();
        for d in &file.datasets {
            check_name("dataset name", &d.name)?;
            if !seen.insert(d.name.as_str()) {
                return Err(format!("dataset '{}' is declared twice", d.name));
            }
            check_source(d)?;
            let mut ids = HashSet::new();
            for id in &d.identifiers {
                check_name(&format!("dataset '{}': identifier name", d.name), &id.name)?;
                if !ids.insert(id.name.as_str()) {
                    return Err(format!(
                        "dataset '{}': identifier '{}' is declared twice",
                        d.name, id.name
                    ));
                }
                if id.column.is_empty() {
                    return Err(format!(
                        "dataset '{}': identifier '{}' has an empty column",
                        d.name, id.name
                    ));
                }
                let ctx = format!("dataset '{}': identifier '{}'", d.name, id.name);
                if id.gmail_rule && id.normaliser != Normaliser::Email {
                    return Err(format!(
                        "{ctx}: key gmail_rule applies to normaliser email only"
                    ));
                }
                if id.case_fold && id.normaliser != Normaliser::Generic {
                    return Err(format!(
                        "{ctx}: key case_fold applies to normaliser generic only"
                    ));
                }
                if let Some(region) = &id.default_region {
                    if id.normaliser != Normaliser::Phone {
                        return Err(format!(
                            "{ctx}: key default_region applies to normaliser phone only"
                        ));
                    }
                    if parse_region(region).is_none() {
                        return Err(format!(
                            "{ctx}: key default_region '{}' is not a region the phone library \
                             knows (two upper-case letters, e.g. US, GB)",
                            region.escape_default()
                        ));
                    }
                }
            }
            let mut cols = HashSet::new();
            for v in &d.values {
                let at = line_of(text, v.column.span());
                if v.column.get_ref().is_empty() {
                    return Err(format!(
                        "line {at}: dataset '{}': key value.column is empty",
                        d.name
                    ));
                }
                if !cols.insert(v.column.get_ref().as_str()) {
                    return Err(format!(
                        "line {at}: dataset '{}': value column '{}' is declared twice",
                        d.name,
                        v.column.get_ref()
                    ));
                }
                if v.min > v.max {
                    return Err(format!(
                        "line {at}: dataset '{}': value column '{}': min {} is above max {}",
                        d.name,
                        v.column.get_ref(),
                        v.min,
                        v.max
                    ));
                }
            }
            for (purpose, column) in &d.consent {
                check_name(
                    &format!("dataset '{}': key consent: purpose", d.name),
                    purpose,
                )?;
                if column.is_empty() {
                    return Err(format!(
                        "dataset '{}': key consent.{purpose} names an empty column",
                        d.name
                    ));
                }
            }
        }
        let delta = file.dp_delta.map_or(DEFAULT_DP_DELTA, Delta::get);
        let mut partners = HashSet::new();
        let mut agreements = Vec::with_capacity(file.agreements.len());
        for a in file.agreements {
            check_name("agreement partner", &a.partner)?;
            if a.partner == file.name {
                return Err(format!(
                    "agreement with '{}', which is this node",
                    a.partner
                ));
            }
            if !partners.insert(a.partner.clone()) {
                return Err(format!(
                    "two agreements with '{}' (one per partner)",
                    a.partner
                ));
            }
            let ctx = format!("agreement with '{}'", a.partner);
            if a.purposes.is_empty() {
                return Err(format!("{ctx}: no purposes (at least one is required)"));
            }
            for p in &a.purposes {
                check_name(&format!("{ctx}: purpose"), p)?;
            }
            if let Some(b) = &a.budget_per_purpose {
                b.validate(&format!("{ctx}: budget_per_purpose"))?;
            }
            if let Some(pin) = &a.partner_key {
                let hex = pin.strip_prefix("sha256:").unwrap_or("");
                if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(format!(
                        "{ctx}: partner_key must be sha256: and 64 lower-case hex digits (what \
                         `cleanroom pki show CERT` prints), not '{}'",
                        pin.escape_default()
                    ));
                }
            }
            for analyst in &a.analysts {
                cleanroom_transport::Identity::analyst(analyst)
                    .map_err(|e| format!("{ctx}: analysts: {e}"))?;
            }
            let mut allow = Vec::with_capacity(a.allow.len());
            for e in &a.allow {
                let at = line_of(text, e.dataset.span());
                let typed = Allow::check(&ctx, e, &file.datasets, text)
                    .map_err(|problem| format!("line {at}: {problem}"))?;
                check_epsilon_caps(
                    e,
                    &ctx,
                    at,
                    a.budget_per_purpose.as_ref(),
                    file.budget.as_ref(),
                    delta,
                )?;
                allow.push(typed);
            }
            agreements.push(Agreement {
                partner: a.partner,
                purposes: a.purposes,
                expires: a.expires,
                allow,
                budget_per_purpose: a.budget_per_purpose,
                partner_key: a.partner_key,
                analysts: a.analysts,
            });
        }
        Ok(NodeConfig {
            name: file.name,
            coordinator: file.coordinator,
            listen: file.listen,
            advertise: file.advertise,
            state_dir: file.state_dir,
            tls: file.tls,
            datasets: file.datasets,
            agreements,
            budget: file.budget,
            ledger: file.ledger,
            retention_days: file.retention_days,
            dp_delta: file.dp_delta,
            dashboard: file.dashboard,
            memory_limit: file.memory_limit,
            spill_dir: file.spill_dir,
            engine: file.engine,
        })
    }
}

/// An allow entry with ε must be capped by a budget, and one run must fit every cap.
fn check_epsilon_caps(
    e: &AllowEntry,
    ctx: &str,
    at: usize,
    purpose_cap: Option<&Budget>,
    node_cap: Option<&Budget>,
    delta: f64,
) -> Result<(), String> {
    let Some(epsilon) = e.epsilon else {
        return Ok(());
    };
    // ε with no cap at all could be spent without end, and averaging enough noised
    // releases removes the noise: refuse it.
    if purpose_cap.is_none() && node_cap.is_none() {
        return Err(format!(
            "line {at}: {ctx}: allow {} on '{}' sets epsilon {epsilon} but no budget \
             caps it: set budget_per_purpose on the agreement or a node-wide \
             [budget] (epsilon_per_period and/or epsilon_lifetime); without one, \
             every run spends epsilon without limit and averaging runs removes the \
             noise",
            e.computation,
            e.dataset.get_ref(),
        ));
    }
    // A run that costs more than a whole cap could never run: say so now rather
    // than veto every job later.
    let cost = run_cost(e.computation, epsilon, delta);
    let caps = [("budget_per_purpose", purpose_cap), ("[budget]", node_cap)];
    for (name, cap) in caps {
        if let Some(cap) = cap.filter(|c| cost > c.tightest() + 1e-9) {
            return Err(format!(
                "line {at}: {ctx}: allow {} on '{}': one run costs epsilon {} \
                 (epsilon {epsilon}{}), above the {name} cap ({}), so no job could \
                 ever run",
                e.computation,
                e.dataset.get_ref(),
                crate::ledger::show(cost),
                if e.computation == Computation::Aggregate {
                    format!(
                        " read as zCDP, rho {}, at dp_delta {:e}",
                        crate::ledger::show(epsilon.get() * epsilon.get() / 2.0),
                        delta
                    )
                } else {
                    String::new()
                },
                cap.describe()
            ));
        }
    }
    Ok(())
}

impl Allow {
    /// Checks one entry as written, in the context `ctx` (`agreement with 'globex'`), against
    /// the declared datasets, and types it by its computation. The error names the rule (the
    /// caller adds the line).
    pub fn check(
        ctx: &str,
        e: &AllowEntry,
        datasets: &[DatasetConfig],
        text: &str,
    ) -> Result<Allow, String> {
        let Some(d) = datasets.iter().find(|d| d.name == *e.dataset.get_ref()) else {
            return Err(format!(
                "{ctx}: allow {} references dataset '{}', which is not declared",
                e.computation,
                e.dataset.get_ref()
            ));
        };
        match e.computation {
            Computation::Aggregate => {
                super::aggregate::check_entry(ctx, e, d).map(Allow::Aggregate)
            }
            Computation::OverlapSum => {
                super::overlap_sum::check_entry(ctx, e, d, text).map(Allow::OverlapSum)
            }
            Computation::Overlap => super::psi::check_entry(ctx, e, d, text).map(Allow::Overlap),
            Computation::Match => super::psi::check_entry(ctx, e, d, text).map(Allow::Match),
        }
    }
}

/// A dataset reads either files (`path`) or a SQL view (`sql` over `[[dataset.table]]`), and the
/// format of every file set is known.
fn check_source(d: &crate::data::DatasetConfig) -> Result<(), String> {
    let has_path = !d.path.as_os_str().is_empty();
    match (&d.sql, has_path) {
        (Some(_), true) => Err(format!(
            "dataset '{}' has both a path and sql: a SQL view reads its [[dataset.table]] \
             entries, so remove one",
            d.name
        )),
        (None, false) => Err(format!(
            "dataset '{}' has no path (a file, directory or glob) and no sql view",
            d.name
        )),
        (None, true) => {
            if !d.tables.is_empty() {
                return Err(format!(
                    "dataset '{}': [[dataset.table]] entries are read by a sql view only; add \
                     `sql` or remove them",
                    d.name
                ));
            }
            if d.format().is_none() {
                return Err(format!(
                    "dataset '{}': cannot tell the format of {} from its extension; add \
                     format = \"csv\", \"parquet\" or \"jsonl\"",
                    d.name,
                    d.path.display()
                ));
            }
            if d.format() != Some(DataFormat::Csv) && !d.delimiter.is_default() {
                return Err(format!(
                    "dataset '{}': delimiter applies to CSV only; remove it",
                    d.name
                ));
            }
            Ok(())
        }
        (Some(sql), false) => {
            if sql.trim().is_empty() {
                return Err(format!("dataset '{}' has an empty sql view", d.name));
            }
            if d.tables.is_empty() {
                return Err(format!(
                    "dataset '{}': the sql view reads no table; declare each with \
                     [[dataset.table]] (name, path)",
                    d.name
                ));
            }
            if !d.delimiter.is_default() {
                return Err(format!(
                    "dataset '{}': a sql view has no delimiter; set it on its CSV \
                     [[dataset.table]] entries",
                    d.name
                ));
            }
            let mut names = HashSet::new();
            for t in &d.tables {
                check_name(&format!("dataset '{}': table name", d.name), &t.name)?;
                if !names.insert(t.name.to_ascii_lowercase()) {
                    return Err(format!(
                        "dataset '{}': table '{}' is declared twice",
                        d.name, t.name
                    ));
                }
                if t.path.as_os_str().is_empty() {
                    return Err(format!(
                        "dataset '{}': table '{}' has an empty path",
                        d.name, t.name
                    ));
                }
                if t.format().is_none() {
                    return Err(format!(
                        "dataset '{}': cannot tell the format of table '{}' ({}) from its \
                         extension; add format = \"csv\", \"parquet\" or \"jsonl\"",
                        d.name,
                        t.name,
                        t.path.display()
                    ));
                }
                if t.format() != Some(DataFormat::Csv) && !t.delimiter.is_default() {
                    return Err(format!(
                        "dataset '{}': table '{}': delimiter applies to CSV only; remove it",
                        d.name, t.name
                    ));
                }
            }
            Ok(())
        }
    }
}
