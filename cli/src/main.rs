//! `consortium-cli`: try the reading service without writing code.
//!
//! The server comes from `--server URL` or `CONSORTIUM_SERVER` (default
//! `http://127.0.0.1:50051`; `https://` with `--ca FILE` for TLS). `login`
//! keeps the token in `--token-file` (default `~/.consortium-token`, mode 0600).

use std::io::{BufRead, Write};

use sha2::Digest;
use std::path::PathBuf;
use std::process::ExitCode;

use consortium_proto::v1 as pb;
use consortium_proto::v1::identity_service_client::IdentityServiceClient;
use consortium_proto::v1::image_service_client::ImageServiceClient;
use consortium_proto::v1::study_service_client::StudyServiceClient;
use consortium_proto::v1::worklist_service_client::WorklistServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const USAGE: &str = "usage: consortium-cli [--server URL] [--ca FILE] [--token-file FILE] <command>
commands:
  login USERNAME                 password from standard input (first line)
  whoami | logout
  worklist [--clinic ID] [--modality M] [--status unread|claimed|reported] [--from YYYYMMDD] [--to YYYYMMDD]
  watch [same filters]           print worklist changes until interrupted
  claim STUDY_UID | release STUDY_UID
  priority STUDY_UID stat|urgent|routine
  study STUDY_UID [--series UID] [--json]
                                 instances in series order, or their DICOM JSON (--series: one series)
  priors STUDY_UID
  render SOP_UID [--frame N] [--window CENTER,WIDTH] [--preset NAME] [--size PIXELS] [--jpeg] --out FILE
  series SERIES_UID [--size PIXELS] --out DIR     every frame as DIR/NNNN.png
  raw SOP_UID --out FILE         the stored Part 10 file, byte for byte";

struct Args {
    rest: Vec<String>,
}

impl Args {
    /// Removes `--name VALUE` and returns VALUE.
    fn flag(&mut self, name: &str) -> Option<String> {
        let i = self.rest.iter().position(|a| a == name)?;
        if i + 1 >= self.rest.len() {
            return None;
        }
        self.rest.remove(i);
        Some(self.rest.remove(i))
    }

    /// Removes `--name` and says whether it was there.
    fn switch(&mut self, name: &str) -> bool {
        match self.rest.iter().position(|a| a == name) {
            Some(i) => {
                self.rest.remove(i);
                true
            }
            None => false,
        }
    }

    fn positional(&mut self, what: &str) -> Result<String, String> {
        if self.rest.is_empty() || self.rest[0].starts_with("--") {
            return Err(format!("missing {what}\n{USAGE}"));
        }
        Ok(self.rest.remove(0))
    }
}

/// `consortium-cli study UID | head`: once the reader has gone, stop as a
/// program killed by SIGPIPE does (status 141, nothing said), instead of
/// println!'s panic and its backtrace.
fn quiet_when_the_reader_goes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_when_the_reader_goes();
    let mut args = Args {
        rest: std::env::args().skip(1).collect(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(&mut args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("consortium-cli: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Passwords and tokens go in clear over `http://`: only to this machine.
fn check_plaintext(server: &str) -> Result<(), String> {
    let Some(rest) = server.strip_prefix("http://") else {
        return Ok(());
    };
    let host = rest.split('/').next().unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "refusing to send a password or token in clear to {host}; use https:// (with --ca)"
        ))
    }
}

async fn connect(server: &str, ca: Option<String>) -> Result<Channel, String> {
    check_plaintext(server)?;
    let mut endpoint = Channel::from_shared(server.to_string()).map_err(|e| e.to_string())?;
    if server.starts_with("https://") {
        // The consortium's own CA (`--ca`); no public roots are built in.
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = ca {
            let pem = std::fs::read(&ca).map_err(|e| format!("cannot read {ca}: {e}"))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))
}

fn authed<T>(msg: T, token: &str) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "the saved token is malformed; log in again".to_string())?,
    );
    Ok(req)
}

fn filter_from(args: &mut Args) -> Result<pb::WorklistFilter, String> {
    let status = match args.flag("--status").as_deref() {
        None => vec![],
        Some("unread") => vec![pb::ItemStatus::Unread as i32],
        Some("claimed") => vec![pb::ItemStatus::Claimed as i32],
        Some("reported") => vec![pb::ItemStatus::Reported as i32],
        Some(other) => return Err(format!("unknown status `{other}`")),
    };
    Ok(pb::WorklistFilter {
        clinic_id: args.flag("--clinic").unwrap_or_default(),
        modality: args.flag("--modality").unwrap_or_default(),
        study_date_from: args.flag("--from").unwrap_or_default(),
        study_date_to: args.flag("--to").unwrap_or_default(),
        statuses: status,
    })
}

fn priority_name(p: i32) -> &'static str {
    match pb::Priority::try_from(p) {
        Ok(pb::Priority::Stat) => "STAT",
        Ok(pb::Priority::Urgent) => "urgent",
        _ => "routine",
    }
}

fn status_name(s: i32) -> &'static str {
    match pb::ItemStatus::try_from(s) {
        Ok(pb::ItemStatus::Claimed) => "claimed",
        Ok(pb::ItemStatus::Reported) => "reported",
        _ => "unread",
    }
}

fn print_item(prefix: &str, i: &pb::WorklistItem) {
    let claim = if i.claimed_by.is_empty() {
        String::new()
    } else {
        format!(" by {}", i.claimed_by)
    };
    println!(
        "{prefix}{}\t{}\t{}{}\t{}\t{}\t{}\t{} images\twaiting {} min\t{}\t{}",
        i.study_instance_uid,
        priority_name(i.priority),
        status_name(i.status),
        claim,
        i.clinic_id,
        i.modalities.join("/"),
        i.study_date,
        i.instance_count,
        i.waiting_seconds / 60,
        i.patient_name,
        i.study_description
    );
}

async fn run(args: &mut Args) -> Result<(), String> {
    let server = args
        .flag("--server")
        .or_else(|| std::env::var("CONSORTIUM_SERVER").ok())
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let ca = args.flag("--ca");
    let token_file = args
        .flag("--token-file")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into()))
                .join(".consortium-token")
        });
    let command = args.positional("a command")?;
    if command == "help" || command == "--help" {
        println!("{USAGE}");
        return Ok(());
    }
    let channel = connect(&server, ca).await?;
    if command == "login" {
        let username = args.positional("USERNAME")?;
        let mut password = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut password)
            .map_err(|e| e.to_string())?;
        let password = password.trim_end_matches(['\r', '\n']).to_string();
        let r = IdentityServiceClient::new(channel)
            .login(pb::LoginRequest { username, password })
            .await
            .map_err(status_text)?
            .into_inner();
        save_token(&token_file, &r.token)?;
        let user = r.user.unwrap_or_default();
        println!(
            "logged in as {} ({:?}, clinic {}); token saved in {}",
            user.username,
            pb::Role::try_from(user.role).unwrap_or(pb::Role::Unspecified),
            user.clinic_id,
            token_file.display()
        );
        return Ok(());
    }
    let token = std::fs::read_to_string(&token_file)
        .map(|t| t.trim().to_string())
        .map_err(|_| {
            format!(
                "not logged in (no {}); run `consortium-cli login USERNAME`",
                token_file.display()
            )
        })?;
    let t = token.as_str();
    match command.as_str() {
        "whoami" => {
            let r = IdentityServiceClient::new(channel)
                .who_am_i(authed(pb::WhoAmIRequest {}, t)?)
                .await
                .map_err(status_text)?
                .into_inner();
            let u = r.user.unwrap_or_default();
            println!(
                "{} ({:?}, clinic {})",
                u.username,
                pb::Role::try_from(u.role).unwrap_or(pb::Role::Unspecified),
                u.clinic_id
            );
        }
        "logout" => {
            IdentityServiceClient::new(channel)
                .logout(authed(pb::LogoutRequest {}, t)?)
                .await
                .map_err(status_text)?;
            let _ = std::fs::remove_file(&token_file);
            println!("logged out");
        }
        "worklist" => {
            let filter = filter_from(args)?;
            let items = WorklistServiceClient::new(channel)
                .list_worklist(authed(
                    pb::ListWorklistRequest {
                        filter: Some(filter),
                        limit: 0,
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?
                .into_inner()
                .items;
            for i in &items {
                print_item("", i);
            }
            eprintln!("{} studies", items.len());
        }
        "watch" => {
            let filter = filter_from(args)?;
            let mut stream = WorklistServiceClient::new(channel)
                .watch_worklist(authed(
                    pb::WatchWorklistRequest {
                        filter: Some(filter),
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(status_text)? {
                let kind = match pb::worklist_event::Kind::try_from(e.kind) {
                    Ok(pb::worklist_event::Kind::Current) => "current ",
                    Ok(pb::worklist_event::Kind::Added) => "added   ",
                    Ok(pb::worklist_event::Kind::Changed) => "changed ",
                    Ok(pb::worklist_event::Kind::Removed) => "removed ",
                    _ => "?       ",
                };
                print_item(kind, &e.item.unwrap_or_default());
                let _ = std::io::stdout().flush();
            }
        }
        "claim" => {
            let uid = args.positional("STUDY_UID")?;
            let item = WorklistServiceClient::new(channel)
                .claim(authed(
                    pb::ClaimRequest {
                        study_instance_uid: uid,
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?
                .into_inner()
                .item
                .unwrap_or_default();
            println!(
                "claimed {} until Unix time {}",
                item.study_instance_uid, item.lease_expires_at_unix
            );
        }
        "release" => {
            let uid = args.positional("STUDY_UID")?;
            WorklistServiceClient::new(channel)
                .release(authed(
                    pb::ReleaseRequest {
                        study_instance_uid: uid.clone(),
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?;
            println!("released {uid}");
        }
        "priority" => {
            let uid = args.positional("STUDY_UID")?;
            let priority = match args.positional("PRIORITY")?.to_ascii_lowercase().as_str() {
                "stat" => pb::Priority::Stat,
                "urgent" => pb::Priority::Urgent,
                "routine" => pb::Priority::Routine,
                other => {
                    return Err(format!(
                        "unknown priority `{other}` (stat, urgent, routine)"
                    ));
                }
            };
            let item = WorklistServiceClient::new(channel)
                .set_priority(authed(
                    pb::SetPriorityRequest {
                        study_instance_uid: uid,
                        priority: priority as i32,
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?
                .into_inner()
                .item
                .unwrap_or_default();
            print_item("", &item);
        }
        "study" => {
            let uid = args.positional("STUDY_UID")?;
            let json = args.switch("--json");
            let series = args.flag("--series").unwrap_or_default();
            // In pages, so that a study of any size comes through.
            let mut client = StudyServiceClient::new(channel).max_decoding_message_size(256 << 20);
            let (mut objects, mut instances, mut page_token) =
                (Vec::new(), Vec::new(), String::new());
            loop {
                let page = client
                    .get_study_metadata(authed(
                        pb::GetStudyMetadataRequest {
                            study_instance_uid: uid.clone(),
                            page_size: 500,
                            page_token,
                            series_instance_uid: series.clone(),
                            ..Default::default()
                        },
                        t,
                    )?)
                    .await
                    .map_err(status_text)?
                    .into_inner();
                // Each page is a JSON array: its items go into one array.
                let inner = page.dicom_json.trim();
                let inner = inner
                    .strip_prefix('[')
                    .and_then(|i| i.strip_suffix(']'))
                    .ok_or("the center's metadata is not a JSON array")?
                    .trim();
                if !inner.is_empty() {
                    objects.push(inner.to_string());
                }
                instances.extend(page.instances);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            let r = pb::GetStudyMetadataResponse {
                dicom_json: format!("[{}]", objects.join(",")),
                instances,
                next_page_token: String::new(),
            };
            if json {
                println!("{}", r.dicom_json);
            } else {
                println!("series\tinstance\tframes\tmodality\tSOP instance UID\tseries UID");
                for i in &r.instances {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        i.series_number,
                        i.instance_number,
                        i.number_of_frames,
                        i.modality,
                        i.sop_instance_uid,
                        i.series_instance_uid
                    );
                }
            }
        }
        "priors" => {
            let uid = args.positional("STUDY_UID")?;
            let priors = StudyServiceClient::new(channel)
                .get_priors(authed(
                    pb::GetPriorsRequest {
                        study_instance_uid: uid,
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?
                .into_inner()
                .priors;
            for p in &priors {
                println!(
                    "{}\t{}\t{}\t{}\t{}\tmatched on {}",
                    p.study_instance_uid,
                    p.clinic_id,
                    p.study_date,
                    p.modalities.join("/"),
                    p.study_description,
                    p.matched_on
                );
            }
            eprintln!("{} prior studies", priors.len());
        }
        "render" => {
            let uid = args.positional("SOP_UID")?;
            let out = args.flag("--out").ok_or("render needs --out FILE")?;
            let options = render_options(args)?;
            let frame = args
                .flag("--frame")
                .map(|f| {
                    f.parse::<u32>()
                        .map_err(|_| "--frame is a number".to_string())
                })
                .transpose()?
                .unwrap_or(1);
            let r = ImageServiceClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .render_frame(authed(
                    pb::RenderFrameRequest {
                        sop_instance_uid: uid,
                        frame_number: frame,
                        options: Some(options),
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?
                .into_inner();
            std::fs::write(&out, &r.data).map_err(|e| format!("cannot write {out}: {e}"))?;
            println!("{out}: {}x{}", r.width, r.height);
        }
        "series" => {
            let uid = args.positional("SERIES_UID")?;
            let out = PathBuf::from(args.flag("--out").ok_or("series needs --out DIR")?);
            let options = render_options(args)?;
            std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
            let mut stream = ImageServiceClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .stream_series(authed(
                    pb::StreamSeriesRequest {
                        series_instance_uid: uid,
                        options: Some(options),
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?
                .into_inner();
            let mut n = 0;
            while let Some(frame) = stream.message().await.map_err(status_text)? {
                n += 1;
                let ext = if frame.format == pb::ImageFormat::Jpeg as i32 {
                    "jpg"
                } else {
                    "png"
                };
                let path = out.join(format!("{n:04}.{ext}"));
                std::fs::write(&path, &frame.data).map_err(|e| e.to_string())?;
            }
            println!("{n} frames in {}", out.display());
        }
        "raw" => {
            let uid = args.positional("SOP_UID")?;
            let out = args.flag("--out").ok_or("raw needs --out FILE")?;
            let mut stream = ImageServiceClient::new(channel)
                .get_raw_instance(authed(
                    pb::GetRawInstanceRequest {
                        sop_instance_uid: uid,
                    },
                    t,
                )?)
                .await
                .map_err(status_text)?
                .into_inner();
            let mut file =
                std::fs::File::create(&out).map_err(|e| format!("cannot create {out}: {e}"))?;
            let (mut total, mut expected_size, mut expected_sha) = (0u64, 0u64, String::new());
            let mut hasher = sha2::Sha256::new();
            while let Some(chunk) = stream.message().await.map_err(status_text)? {
                if chunk.offset == 0 {
                    expected_sha = chunk.sha256.clone();
                    expected_size = chunk.total_size;
                }
                if chunk.offset != total {
                    return Err(format!(
                        "chunk at offset {} where {total} was expected",
                        chunk.offset
                    ));
                }
                hasher.update(&chunk.data);
                file.write_all(&chunk.data).map_err(|e| e.to_string())?;
                total += chunk.data.len() as u64;
            }
            let sha: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if total != expected_size || sha != expected_sha {
                let _ = std::fs::remove_file(&out);
                return Err(format!(
                    "received {total} bytes with SHA-256 {sha}, the center announced {expected_size} bytes with {expected_sha}; nothing kept"
                ));
            }
            file.sync_all().map_err(|e| e.to_string())?;
            println!("{out}: {total} bytes, SHA-256 {sha} (verified)");
        }
        other => return Err(format!("unknown command `{other}`\n{USAGE}")),
    }
    if !args.rest.is_empty() {
        eprintln!("consortium-cli: ignored arguments: {}", args.rest.join(" "));
    }
    Ok(())
}

fn render_options(args: &mut Args) -> Result<pb::RenderOptions, String> {
    let window = args
        .flag("--window")
        .map(|w| {
            let (c, w) = w.split_once(',').ok_or("--window is CENTER,WIDTH")?;
            Ok::<_, String>(pb::Window {
                center: c.trim().parse().map_err(|_| "bad window center")?,
                width: w.trim().parse().map_err(|_| "bad window width")?,
            })
        })
        .transpose()?;
    let size = args
        .flag("--size")
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| "--size is a number of pixels".to_string())
        })
        .transpose()?
        .unwrap_or(0);
    let jpeg = args.switch("--jpeg");
    Ok(pb::RenderOptions {
        format: if jpeg {
            pb::ImageFormat::Jpeg
        } else {
            pb::ImageFormat::Png
        } as i32,
        max_width: size,
        max_height: size,
        window,
        preset: args.flag("--preset").unwrap_or_default(),
        jpeg_quality: 0,
    })
}

fn save_token(path: &PathBuf, token: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot save the token in {}: {e}", path.display()))?;
    // An existing file keeps its mode on open: make it private in any case.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    f.write_all(token.as_bytes()).map_err(|e| e.to_string())
}
