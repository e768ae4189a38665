//! A real S3 endpoint for the object-storage tests: SeaweedFS 4.48
//! (`weed server -s3`), installed by `scripts/seaweedfs.sh` into
//! `target/tools/seaweedfs`, started once per test binary on loopback ports
//! (`servers`) with one identity, [`ACCESS_KEY`]/[`SECRET_KEY`].

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::servers;

pub const ACCESS_KEY: &str = "weir-test-key";
pub const SECRET_KEY: &str = "weir-test-secret";

/// A running S3 endpoint.
#[derive(Debug)]
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub dir: PathBuf,
}

impl S3Server {
    /// The environment the AWS tools (and Weir) read the endpoint and the
    /// credentials from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl S3Server {
    /// A client of `bucket` with the test identity.
    pub fn client(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_bucket_name(bucket)
            .build()
            .expect("an S3 client")
    }

    /// Makes sure `bucket` exists: the first put creates it (the gateway
    /// listens before its filer is ready, so it retries for a while).
    pub fn bucket(&self, bucket: &str) {
        use object_store::ObjectStoreExt;
        let store = self.client(bucket);
        let since = std::time::Instant::now();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            loop {
                let marker = object_store::path::Path::from(".weir-tests");
                match store.put(&marker, b"ok".to_vec().into()).await {
                    Ok(_) => break,
                    Err(error) => {
                        assert!(
                            since.elapsed() < Duration::from_secs(60),
                            "the S3 server does not take a put: {error}"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }
}

/// The server, started on first use; None (after a loud message) when it
/// cannot be installed outside CI.
pub fn server() -> Option<&'static S3Server> {
    static SERVER: OnceLock<Option<S3Server>> = OnceLock::new();
    SERVER.get_or_init(start).as_ref()
}

/// Eight ports: four HTTP ports whose gRPC ports (+10000) are free too.
fn ports() -> [u16; 4] {
    loop {
        let picked = [(); 4].map(|()| servers::free_port());
        let ok = picked
            .iter()
            .all(|&p| p < 55000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok());
        let distinct = picked
            .iter()
            .enumerate()
            .all(|(i, p)| !picked[..i].contains(p) && !picked.contains(&(p + 10000)));
        if ok && distinct {
            return picked;
        }
    }
}

fn start() -> Option<S3Server> {
    let binary = servers::install("seaweedfs.sh", "S3 (SeaweedFS)")?;
    let dir = servers::data_dir("seaweedfs");
    let config = dir.join("s3.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"identities":[{{"name":"weir","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        ),
    )
    .expect("the S3 identity file");
    let [master, volume, filer, s3] = ports();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let args: Vec<String> = [
        "server".to_string(),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-dir={}", data.display()),
        format!("-master.port={master}"),
        format!("-volume.port={volume}"),
        format!("-filer.port={filer}"),
        "-s3".into(),
        format!("-s3.port={s3}"),
        format!("-s3.config={}", config.display()),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        "-master.volumeSizeLimitMB=64".into(),
        "-volume.max=50".into(),
    ]
    .into();
    servers::spawn_for_life(binary, args, dir.join("server.log"));
    servers::wait_listening(s3, "SeaweedFS S3", Duration::from_secs(60));
    Some(S3Server {
        endpoint: format!("http://127.0.0.1:{s3}"),
        dir,
    })
}
