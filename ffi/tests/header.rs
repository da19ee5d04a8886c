//! The committed C header `include/remem.h` must be what cbindgen makes of
//! the sources today. `REMEM_BLESS=1 cargo test -p remem-ffi --test header`
//! rewrites it.

use std::path::Path;

#[test]
fn header_is_fresh() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("reading cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = dir.join("include/remem.h");
    if std::env::var_os("REMEM_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("writing include/remem.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    if committed != fresh {
        let tmp = std::env::temp_dir().join(format!("remem.h.{}", std::process::id()));
        let _ = std::fs::write(&tmp, &fresh);
        panic!(
            "{} is stale (the fresh one is in {}; diff them to see what changed).\n\
             Regenerate it with: REMEM_BLESS=1 cargo test -p remem-ffi --test header",
            path.display(),
            tmp.display()
        );
    }
}
