//! Validation of job specs submitted by analysts, before anything is stored or offered.

use cleanroom_proto::v1::{JobKind, JobSpec};
use cleanroom_transport::Identity;

/// Longest purpose, dataset or key name accepted.
const MAX_NAME: usize = 128;
/// Most identifier columns in a composite key.
const MAX_KEYS: usize = 8;

/// Checks that a spec is well-formed; the error says what to fix.
pub fn validate(spec: &JobSpec) -> Result<(), String> {
    let kind = JobKind::try_from(spec.kind).unwrap_or(JobKind::Unspecified);
    match kind {
        JobKind::Overlap | JobKind::Match => {}
        JobKind::Unspecified => return Err("job kind must be overlap or match".into()),
    }
    if spec.parties.len() != 2 {
        return Err(format!(
            "{} needs exactly two parties (--between A,B), got {}",
            kind.as_str_name(),
            spec.parties.len()
        ));
    }
    if spec.parties[0].node == spec.parties[1].node {
        return Err("the two parties must be different nodes".into());
    }
    check_name("purpose", &spec.purpose)?;
    for party in &spec.parties {
        Identity::node(&party.node).map_err(|e| format!("party '{}': {e}", party.node))?;
        check_name("dataset", &party.dataset)?;
        if party.keys.is_empty() || party.keys.len() > MAX_KEYS {
            return Err(format!(
                "party '{}': give 1 to {MAX_KEYS} join keys (--on)",
                party.node
            ));
        }
        for key in &party.keys {
            check_name("join key", key)?;
        }
        if party.learns_membership && kind != JobKind::Match {
            return Err("only match jobs reveal membership".into());
        }
    }
    if spec.parties[0].keys != spec.parties[1].keys {
        return Err("both parties must join on the same keys".into());
    }
    Ok(())
}

fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_NAME {
        return Err(format!("{what} must be 1 to {MAX_NAME} characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "{what} '{value}' may contain only letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::PartySpec;

    fn party(node: &str) -> PartySpec {
        PartySpec {
            node: node.into(),
            dataset: "customers".into(),
            keys: vec!["email".into()],
            learns_membership: false,
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            kind: JobKind::Overlap as i32,
            parties: vec![party("acme"), party("globex")],
            purpose: "overlap-reporting".into(),
        }
    }

    #[test]
    fn accepts_a_good_spec() {
        assert_eq!(validate(&spec()), Ok(()));
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        let mut s = spec();
        s.parties.pop();
        assert!(validate(&s).unwrap_err().contains("exactly two"));
        let mut s = spec();
        s.parties[1].node = "acme".into();
        assert!(validate(&s).unwrap_err().contains("different"));
        let mut s = spec();
        s.purpose = "drop table;".into();
        assert!(validate(&s).unwrap_err().contains("purpose"));
        let mut s = spec();
        s.kind = 99;
        assert!(validate(&s).unwrap_err().contains("kind"));
        let mut s = spec();
        s.parties[0].learns_membership = true;
        assert!(validate(&s).unwrap_err().contains("membership"));
        let mut s = spec();
        s.parties[1].keys = vec!["phone".into()];
        assert!(validate(&s).unwrap_err().contains("same keys"));
    }
}
