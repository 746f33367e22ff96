//! `NodeConfig::parse` on arbitrary UTF-8 returns a config or a `ConfigError`, never panics. A
//! config that parses has passed validation: check a few of its promises.
#![no_main]

use std::path::Path;

use cleanroom_node::policy::{NodeConfig, is_valid_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let path = Path::new("/etc/cleanroom/node.toml");
    let Ok(cfg) = NodeConfig::parse(text, path) else {
        return;
    };
    assert!(is_valid_name(&cfg.name));
    // Relative paths were anchored at the config's directory.
    assert!(cfg.state_dir.is_absolute(), "{:?}", cfg.state_dir);
    assert!(cfg.tls.ca.is_absolute() && cfg.tls.cert.is_absolute() && cfg.tls.key.is_absolute());
    for d in &cfg.datasets {
        assert!(is_valid_name(&d.name));
        assert!(d.path.is_absolute(), "{:?}", d.path);
        for id in &d.identifiers {
            assert!(is_valid_name(&id.name) && !id.column.is_empty());
        }
    }
    for a in &cfg.agreements {
        assert!(is_valid_name(&a.partner) && a.partner != cfg.name);
        assert!(!a.purposes.is_empty());
        for e in &a.allow {
            assert!(cfg.dataset(e.dataset()).is_some());
            assert!(e.terms().min_set_size <= e.terms().max_set_size);
        }
    }
});
