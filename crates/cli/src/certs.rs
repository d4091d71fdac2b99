//! `aloft certs`: an app's custom domains and their TLS certificates, and the root of the edge's
//! local CA.
//!
//! `add HOSTNAME` asks the edge for a certificate (ACME when the edge has it, else its local CA)
//! and prints the DNS records to create; `list`, `show`, `check` (queues a failed one again) and
//! `remove` work on the app's hostnames; `root` prints the local CA's root (PEM) so that clients
//! can trust `https://<app>.<base domain>`: `aloft certs root > ca.pem && curl --cacert ca.pem …`.

use aloft_api::Certificate;
use aloft_client::ClientError;
use clap::{Args, Subcommand};

use crate::api::{AppArg, Subject, api_error, print_json};
use crate::context::{ApiSettings, Context};
use crate::errors::{EXIT_NOT_FOUND, UserError};

/// `aloft certs …`.
#[derive(Debug, Subcommand)]
pub(crate) enum CertsCommand {
    /// Add a custom domain to the app; the edge issues its certificate.
    Add(HostArgs),
    /// List the app's custom domains and their certificates.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one certificate: status, issuer, expiry, the DNS records to create.
    Show(HostArgs),
    /// Ask the edge to try a failed certificate again.
    Check(HostArgs),
    /// Remove a custom domain from the app.
    #[command(visible_alias = "rm")]
    Remove(HostArgs),
    /// Print the root certificate of the edge's local CA (PEM), for clients to trust.
    Root,
}

/// `aloft certs list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    app: AppArg,
    /// Print the certificates as JSON (the API's objects).
    #[arg(long)]
    json: bool,
}

/// `aloft certs add|show|check|remove HOSTNAME`.
#[derive(Debug, Args)]
pub(crate) struct HostArgs {
    #[command(flatten)]
    app: AppArg,
    /// The custom domain, e.g. www.example.com.
    hostname: String,
    /// Print the certificate as JSON (the API's object).
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(ctx: &Context, cmd: CertsCommand) -> anyhow::Result<()> {
    if let CertsCommand::Root = cmd {
        let (client, settings) = ctx.api_client()?;
        let pem = client
            .edge_ca()
            .await
            .map_err(|e| api_error(e, &settings, Subject::None))?;
        print!("{pem}");
        return Ok(());
    }
    if let CertsCommand::List(args) = cmd {
        let app = args.app.resolve()?;
        let (client, settings) = ctx.api_client()?;
        let certs = client
            .certs_list(&app)
            .await
            .map_err(|e| api_error(e, &settings, Subject::App(&app)))?;
        return if args.json {
            print_json(&certs)
        } else {
            print!("{}", table(&certs));
            Ok(())
        };
    }
    let (verb, args) = match cmd {
        CertsCommand::Add(a) => ("add", a),
        CertsCommand::Show(a) => ("show", a),
        CertsCommand::Check(a) => ("check", a),
        CertsCommand::Remove(a) => ("remove", a),
        CertsCommand::List(_) | CertsCommand::Root => return Ok(()),
    };
    let app = args.app.resolve()?;
    let host = args.hostname.as_str();
    let (client, settings) = ctx.api_client()?;
    let err = |e| cert_error(e, &settings, &app, host);
    let cert = match verb {
        "add" => client.cert_add(&app, host).await.map_err(err)?,
        "check" => client.cert_check(&app, host).await.map_err(err)?,
        "remove" => {
            client.cert_delete(&app, host).await.map_err(err)?;
            if !args.json {
                println!("Removed {host} from app {app}.");
            }
            return Ok(());
        }
        _ => client.cert_get(&app, host).await.map_err(err)?,
    };
    if args.json {
        return print_json(&cert);
    }
    if verb == "add" {
        println!(
            "Added {} to app {app}; the edge is issuing its certificate.",
            cert.hostname
        );
    }
    print!("{}", details(&cert));
    Ok(())
}

/// A 404 about the hostname (the app exists) says so; anything else as other commands do.
fn cert_error(e: ClientError, settings: &ApiSettings, app: &str, hostname: &str) -> anyhow::Error {
    match &e {
        ClientError::Api { status: 404, message } if message.starts_with("certificate") => UserError {
            message: format!("app {app} has no certificate for {hostname}"),
            hint: Some(format!("aloft certs list -a {app} shows its hostnames")),
            code: EXIT_NOT_FOUND,
        }
        .into(),
        _ => api_error(e, settings, Subject::App(app)),
    }
}

/// HOSTNAME STATUS SOURCE EXPIRES.
fn table(certs: &[Certificate]) -> String {
    let rows: Vec<Vec<String>> = certs
        .iter()
        .map(|c| {
            vec![
                c.hostname.clone(),
                c.status.as_str().to_owned(),
                c.source.map(|s| s.as_str().to_owned()).unwrap_or_default(),
                c.expires_at.clone().unwrap_or_default(),
            ]
        })
        .collect();
    crate::api::table(&["HOSTNAME", "STATUS", "SOURCE", "EXPIRES"], &rows)
}

/// One certificate for people, with the DNS records to create.
fn details(c: &Certificate) -> String {
    let mut rows = vec![
        ("Hostname", c.hostname.clone()),
        ("App", c.app.clone()),
        ("Status", c.status.as_str().to_owned()),
    ];
    if let Some(s) = c.source {
        rows.push(("Source", s.as_str().to_owned()));
    }
    if let Some(i) = &c.issuer {
        rows.push(("Issuer", i.clone()));
    }
    if let Some(e) = &c.expires_at {
        rows.push(("Expires", e.clone()));
    }
    if let Some(e) = &c.error {
        rows.push(("Error", e.clone()));
    }
    rows.push(("Added", c.created_at.clone()));
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<10}{v}\n"));
    }
    if !c.check_hints.is_empty() {
        out.push_str("\nPoint the hostname at the edge with one of these DNS records:\n");
        for h in &c.check_hints {
            out.push_str(&format!("  {h}\n"));
        }
    }
    if c.error.is_some() {
        out.push_str(&format!(
            "\nFix the cause, then try again: aloft certs check {} -a {}\n",
            c.hostname, c.app
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use aloft_api::{CertificateRecord, CertificateStatus, DnsRequirements};

    use super::*;

    fn cert() -> Certificate {
        let mut r = CertificateRecord::pending("www.example.com", "web", 0);
        r.status = CertificateStatus::Failed;
        r.error = Some("no A record".into());
        r.view(DnsRequirements {
            a: vec!["192.0.2.1".into()],
            aaaa: vec![],
            cname: "web.localhost".into(),
        })
    }

    #[test]
    fn details_name_the_records_and_the_next_step() {
        let text = details(&cert());
        assert!(text.contains("Status    failed\n"), "{text}");
        assert!(
            text.contains("  CNAME www.example.com -> web.localhost\n"),
            "{text}"
        );
        assert!(text.contains("  A www.example.com -> 192.0.2.1\n"), "{text}");
        assert!(
            text.contains("aloft certs check www.example.com -a web"),
            "{text}"
        );
    }

    #[test]
    fn table_rows() {
        let text = table(&[cert()]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("HOSTNAME"), "{text}");
        assert!(lines[1].starts_with("www.example.com   failed"), "{text}");
    }
}
