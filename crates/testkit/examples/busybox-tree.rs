//! Writes a busybox root tree into a directory: `cargo run -p aloft-testkit --example busybox-tree -- DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os().nth(1).ok_or("usage: busybox-tree DIR")?;
    aloft_testkit::busybox_tree(std::path::Path::new(&dir))?;
    Ok(())
}
