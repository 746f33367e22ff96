//! `cleanroom pki …`: the consortium CA's commands and the party's `request`.

use std::path::{Path, PathBuf};

use anyhow::bail;
use cleanroom_node::outln;
use cleanroom_transport::Identity;
use cleanroom_transport::pki::{self, RevokeTarget};

use crate::args::{PkiCommand, PkiIssue, RoleArg};

/// The identity `--role` and `--name` describe.
fn identity(role: RoleArg, name: Option<&str>) -> anyhow::Result<Identity> {
    Ok(match (role, name) {
        (RoleArg::Coordinator, None) => Identity::coordinator(),
        (RoleArg::Coordinator, Some(_)) => {
            bail!("the coordinator has no name (there is one per consortium); drop --name")
        }
        (RoleArg::Node, Some(n)) => Identity::node(n)?,
        (RoleArg::Analyst, Some(n)) => Identity::analyst(n)?,
        (RoleArg::Node | RoleArg::Analyst, None) => {
            bail!("give the {} name with --name", role.role())
        }
    })
}

fn date(t: time::OffsetDateTime) -> String {
    t.date().to_string()
}

/// The default certificate path for a request: its path with `.pem`.
fn cert_path_for(request: &Path) -> PathBuf {
    request.with_extension("pem")
}

/// Runs one `pki` command.
pub fn run(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init { dir, consortium } => {
            let paths = pki::init_ca(&dir, &consortium)?;
            outln!(
                "consortium CA written: {} (keep {} secret; CRL {})",
                paths.cert.display(),
                paths.key.display(),
                paths.crl.display()
            );
        }
        PkiCommand::Request {
            name,
            role,
            out,
            renew,
        } => {
            let id = identity(role, name.as_deref())?;
            let r = pki::request(&id, &out, renew)?;
            if r.reused_key {
                outln!(
                    "renewal request for {id}: {} (key {} kept)",
                    r.csr.display(),
                    r.key.display()
                );
            } else {
                outln!(
                    "key for {id}: {} (mode 0600; it stays here)",
                    r.key.display()
                );
                outln!("certificate request: {}", r.csr.display());
            }
            outln!("key fingerprint: {}", r.key_fingerprint);
            outln!(
                "send {} to the CA operator, who runs `cleanroom pki sign {}`",
                r.csr.display(),
                r.csr
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
        }
        PkiCommand::Sign {
            dir,
            request,
            out,
            days,
            replace,
        } => {
            let out = out.unwrap_or_else(|| cert_path_for(&request));
            let c = pki::sign(
                &dir,
                &request,
                &out,
                time::Duration::days(i64::from(days)),
                replace,
            )?;
            outln!(
                "certificate for {}: {} (serial {}, valid until {})",
                c.identity,
                c.path.display(),
                c.serial,
                date(c.not_after)
            );
            outln!("key fingerprint: {}", c.key_fingerprint);
            // The operator should see when this identity already has another key: a partner
            // that pinned the old one will refuse this certificate.
            let others: Vec<_> = pki::issued(&dir)?
                .into_iter()
                .filter(|o| o.identity == c.identity && o.key_fingerprint != c.key_fingerprint)
                .collect();
            if !others.is_empty() {
                outln!(
                    "note: {} also holds {} certificate(s) for another key; agreements that pin \
                     that key refuse this one",
                    c.identity,
                    others.len()
                );
            }
        }
        PkiCommand::Revoke {
            dir,
            name,
            role,
            serial,
        } => {
            let target = match (name, serial) {
                (_, Some(s)) => RevokeTarget::Serial(s),
                (Some(name), None) => RevokeTarget::Name {
                    name,
                    role: role.map(RoleArg::role),
                },
                (None, None) => bail!("name the party to revoke, or give --serial"),
            };
            let r = pki::revoke(&dir, &target)?;
            for c in &r.newly {
                outln!("revoked {} (serial {})", c.identity, c.serial);
            }
            if r.already > 0 {
                outln!("{} matching certificate(s) were already revoked", r.already);
            }
            outln!(
                "CRL written: {} (copy it to every node and the coordinator)",
                r.crl.display()
            );
        }
        PkiCommand::Crl { dir } => {
            let path = pki::refresh_crl(&dir)?;
            outln!("CRL written: {}", path.display());
        }
        PkiCommand::List { dir } => {
            let revoked: Vec<String> = pki::revocations(&dir)?
                .into_iter()
                .map(|r| r.serial)
                .collect();
            let now = time::OffsetDateTime::now_utc();
            let rows: Vec<Vec<String>> = pki::issued(&dir)?
                .into_iter()
                .map(|c| {
                    let status = if revoked.contains(&c.serial) {
                        "revoked"
                    } else if c.not_after < now {
                        "expired"
                    } else {
                        "valid"
                    };
                    vec![
                        c.identity.role.to_string(),
                        c.identity.name.clone(),
                        c.serial.clone(),
                        date(c.not_after),
                        status.to_owned(),
                        c.key_fingerprint.clone(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                outln!(
                    "no certificates issued yet ({} is empty)",
                    dir.join(pki::ISSUED_DIR).display()
                );
            } else {
                print_table(
                    &["ROLE", "NAME", "SERIAL", "EXPIRES", "STATUS", "KEY"],
                    &rows,
                );
            }
        }
        PkiCommand::Show { cert } => {
            let c = pki::cert_info(&cert)?;
            outln!("identity: {}", c.identity);
            outln!("serial: {}", c.serial);
            outln!("valid until: {}", date(c.not_after));
            outln!("key fingerprint: {}", c.key_fingerprint);
        }
        PkiCommand::Issue { dir, out, who } => {
            let identity = match who {
                PkiIssue::Node { name } => Identity::node(&name)?,
                PkiIssue::Analyst { name } => Identity::analyst(&name)?,
                PkiIssue::Coordinator => Identity::coordinator(),
            };
            let out = out.unwrap_or_else(|| dir.clone());
            let paths = pki::issue(&dir, &identity, &out)?;
            outln!(
                "certificate for {identity}: {} (key {}; demo and tests only: this key was made \
                 at the CA)",
                paths.cert.display(),
                paths.key.display()
            );
        }
    }
    Ok(())
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s
    };
    outln!("{}", line(header.to_vec()));
    for r in rows {
        outln!("{}", line(r.iter().map(String::as_str).collect()));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `cleanroom audit-heads --node NAME`: the node's signed heads as JSON lines.
pub async fn audit_heads(
    conn: crate::args::ConnArgs,
    node: &str,
    out: Option<&std::path::Path>,
) -> anyhow::Result<std::process::ExitCode> {
    let client = crate::analyst::connect(&conn).await?;
    let heads = client.audit_heads(node).await?;
    client.close().await;
    let mut text = String::new();
    for h in &heads {
        let Some(signed) = &h.signed else { continue };
        let line = serde_json::json!({
            "node": h.node,
            "job_id": h.job_id,
            "head": signed.head,
            "public_key": hex(&signed.public_key),
            "signature": hex(&signed.signature),
            "received_ms": h.received_ms,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    match out {
        Some(path) => {
            std::fs::write(path, &text)
                .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
            eprintln!(
                "{} signed heads of node {node} written to {}",
                heads.len(),
                path.display()
            );
        }
        None => cleanroom_node::out!("{text}"),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
