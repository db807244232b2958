//! Compiles the C shim for the parts of the Tcl API that are macros
//! (`Tcl_InitStubs`) and links Tcl's stub library, so the extension
//! calls Tcl only through the stubs table and never links libtcl itself.
//!
//! The Tcl is the one `pkg-config tcl` names, as for `tcl-sys`, whose
//! bindings come from the same headers: Tcl 8.6 by default, Tcl 9 when
//! PKG_CONFIG_PATH points at a Tcl 9 `tcl.pc` (`make build-tcl9`). For
//! Tcl 9 this sets `cfg(tcl9)`, which `src/tcl.rs` alone reads.

fn main() {
    println!("cargo:rerun-if-changed=src/stubs_shim.c");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo::rustc-check-cfg=cfg(tcl9)");
    let tcl = pkg_config::Config::new()
        .cargo_metadata(false)
        .probe("tcl")
        .expect("pkg-config finds no Tcl (Debian: tcl-dev)");
    let include = tcl.include_paths.first().cloned().unwrap_or_else(|| "/usr/include/tcl8.6".into());
    let major = major_version(&include.join("tcl.h"));
    if major >= 9 {
        println!("cargo:rustc-cfg=tcl9");
    }
    cc::Build::new()
        .file("src/stubs_shim.c")
        .include(&include)
        .define("USE_TCL_STUBS", None)
        .warnings(true)
        .compile("socketserver_shim");
    let libdir =
        tcl.link_paths.first().map(|p| p.display().to_string()).unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu".into());
    println!("cargo:rustc-link-search=native={libdir}");
    let version: String = tcl.version.split('.').take(2).collect::<Vec<_>>().join(".");
    println!("cargo:rustc-link-lib=static=tclstub{version}");
}

/// `TCL_MAJOR_VERSION` from tcl.h.
fn major_version(header: &std::path::Path) -> u32 {
    let text = std::fs::read_to_string(header).unwrap_or_default();
    text.lines()
        .find_map(|line| {
            // "#define TCL_MAJOR_VERSION 8" or "#   define TCL_MAJOR_VERSION\t9"
            let words: Vec<&str> = line.trim_start_matches('#').split_whitespace().collect();
            match words.as_slice() {
                ["define", "TCL_MAJOR_VERSION", value] => value.parse().ok(),
                _ => None,
            }
        })
        .unwrap_or(8)
}
