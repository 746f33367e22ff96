//! Text a node sends — the reason it refused or failed a job — is stored as the job's reason,
//! logged, and printed on an analyst's terminal. A hostile node could make it as large as a
//! frame (1 MiB: the job's record then no longer fits in a `GetJob` answer, so nobody can read
//! the job) or fill it with terminal escapes. [`node_text`] bounds it and makes it inert.

/// Most bytes of a node's text kept (honest reasons are one line of a few hundred bytes).
pub const MAX_NODE_TEXT: usize = 4096;

/// `text` cut to at most [`MAX_NODE_TEXT`] bytes (on a character boundary, saying how much was
/// cut) with its control characters other than newline and tab escaped (`\u{1b}`).
pub fn node_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_NODE_TEXT + 64));
    for (at, ch) in text.char_indices() {
        if out.len() + ch.len_utf8() > MAX_NODE_TEXT {
            out.push_str(&format!("… ({} more bytes cut)", text.len() - at));
            break;
        }
        if ch.is_control() && ch != '\n' && ch != '\t' {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honest_text_is_unchanged() {
        let reason = "node 'acme' refused: no agreement with initech\tfor 'fraud-benchmark'\n";
        assert_eq!(node_text(reason), reason);
    }

    #[test]
    fn escapes_are_inert_and_long_text_is_cut() {
        assert_eq!(node_text("a\u{1b}[2Jb\r"), "a\\u{1b}[2Jb\\r");
        let long = format!("é{}", "x".repeat(1 << 20));
        let cut = node_text(&long);
        assert!(cut.len() <= MAX_NODE_TEXT + 64, "{}", cut.len());
        assert!(cut.starts_with("éxxx"));
        assert!(cut.ends_with(&format!(
            "… ({} more bytes cut)",
            long.len() - MAX_NODE_TEXT
        )));
    }
}
