//! Which curve25519-dalek backend this process runs on.
//!
//! dalek chooses at run time among the backends compiled in: AVX-512 IFMA (when built with
//! `--cfg curve25519_dalek_backend="avx512"`, as `.cargo/config.toml` does), AVX2, or its
//! portable serial code. Its choice is private, so this repeats its rule: the same compile-time
//! configuration and the same CPU features. Benchmarks print it next to their figures.

/// The backend dalek uses in this process: `"avx512ifma"`, `"avx2"` or `"serial"`.
pub fn curve_backend() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let ifma_built = cfg!(curve25519_dalek_backend = "avx512")
            || cfg!(all(
                target_feature = "avx512ifma",
                target_feature = "avx512vl"
            ));
        if ifma_built
            && std::is_x86_feature_detected!("avx512ifma")
            && std::is_x86_feature_detected!("avx512vl")
        {
            return "avx512ifma";
        }
        if cfg!(target_pointer_width = "64") && std::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "serial"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_one_of_the_three_backends() {
        assert!(["avx512ifma", "avx2", "serial"].contains(&curve_backend()));
    }

    /// The workspace's `.cargo/config.toml` compiles the IFMA backend in; on a CPU that has it,
    /// that is what must run (this is the 1.5× of docs/BENCHMARKS.md).
    #[test]
    #[cfg(target_arch = "x86_64")]
    // The cfg is constant per build, and that is the point: a build without it must fail here.
    #[allow(clippy::assertions_on_constants)]
    fn the_default_build_runs_ifma_where_the_cpu_has_it() {
        if std::is_x86_feature_detected!("avx512ifma") && std::is_x86_feature_detected!("avx512vl")
        {
            assert!(
                cfg!(curve25519_dalek_backend = "avx512"),
                "built without the avx512 backend: is RUSTFLAGS overriding .cargo/config.toml?"
            );
            assert_eq!(curve_backend(), "avx512ifma");
        }
    }
}
