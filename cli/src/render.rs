//! `apisec render istio|envoy-gateway POLICY --digest D --out DIR`: the Kubernetes manifests that
//! run apisec under Istio or Envoy Gateway, made from the policy with the same validation as
//! `policy apply` (secrets where set, and with `--against` the review of changes), one resource
//! per file: the filter with the policy, failing closed and pinned to the image digest; the
//! native guard after it; the secrets' variables (the audit chain key among them) from a Secret;
//! the audit access log; and, on Envoy Gateway, a BackendTrafficPolicy for what the filter does
//! not do (backend timeouts and circuit breaking). `tests/test_render.py` validates each file
//! against the projects' published schemas (deploy/schemas).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

#[derive(clap::Subcommand)]
pub enum Render {
    /// A WasmPlugin, the guard's EnvoyFilter, the audit Telemetry and its mesh provider, the
    /// Secret and the gateway Deployment's environment
    Istio(IstioArgs),
    /// An EnvoyExtensionPolicy, the guard's EnvoyPatchPolicy, an EnvoyProxy (secrets and the
    /// audit access log), the Secret and a BackendTrafficPolicy
    EnvoyGateway(EnvoyGatewayArgs),
}

#[derive(clap::Args)]
pub struct Common {
    /// The policy (YAML or JSON)
    policy: String,
    /// The image's OCI manifest digest (`sha256:HEX` or HEX), or the file `make dist` wrote it
    /// to (dist/apisec-filter-VERSION.oci.digest)
    #[arg(long)]
    digest: String,
    /// The image, without the digest
    #[arg(long, default_value = concat!("registry.example.com/apisec/apisec-filter:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// Where to write the manifests (created)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The policy in force (e.g. the applied-policy.json of the last rendering): a change of an
    /// API's state or level needs a new review record (OPS-1, LVL-4), as `policy apply` says
    #[arg(long, value_name = "IN_FORCE")]
    against: Option<String>,
}

#[derive(clap::Args)]
pub struct IstioArgs {
    #[command(flatten)]
    common: Common,
    /// The gateway's namespace
    #[arg(long, default_value = "istio-system")]
    namespace: String,
    /// The gateway Deployment (and its `istio` label)
    #[arg(long, default_value = "istio-ingressgateway")]
    gateway: String,
    /// The value of the gateway pods' `istio` label
    #[arg(long, default_value = "ingressgateway")]
    selector: String,
}

#[derive(clap::Args)]
pub struct EnvoyGatewayArgs {
    #[command(flatten)]
    common: Common,
    /// The Gateway's namespace
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The Gateway the partners call
    #[arg(long, default_value = "partner-gateway")]
    gateway: String,
    /// The Gateway's HTTPS listener name (the guard is patched into it)
    #[arg(long, default_value = "https")]
    listener: String,
    /// Envoy Gateway's own namespace (where the EnvoyProxy and the Secret go)
    #[arg(long, default_value = "envoy-gateway-system")]
    system_namespace: String,
}

const ISTIO_GUARD: &str = include_str!("../../deploy/istio/apisec-guard.yaml");
const EG_GUARD: &str = include_str!("../../deploy/envoy-gateway/apisec-guard.yaml");
/// The audit access log: the filter's sealed record, printed as it is (envoy/gateway.yaml).
const AUDIT_FORMAT: &str = "%FILTER_STATE(wasm.apisec_audit:PLAIN)%\n";
const AUDIT_MATCH: &str = "'wasm.apisec_audit' in filter_state";

pub fn run(cmd: Render) -> Result<(), String> {
    match cmd {
        Render::Istio(a) => istio(&a),
        Render::EnvoyGateway(a) => envoy_gateway(&a),
    }
}

/// The policy, validated as `policy apply` validates it, as the JSON the filter reads, and the
/// environment variables its secrets come from.
fn checked(c: &Common) -> Result<(Value, Vec<String>, String), String> {
    let (raw, _) = crate::policy::checked(&c.policy, c.against.as_deref())?;
    let names = raw.secret_env_names();
    let doc = serde_json::to_value(&raw).map_err(|e| e.to_string())?;
    Ok((doc, names, digest(&c.digest)?))
}

fn digest(given: &str) -> Result<String, String> {
    let text = if Path::new(given).is_file() {
        std::fs::read_to_string(given).map_err(|e| format!("{given}: {e}"))?
    } else {
        given.to_string()
    };
    let hex = text.trim().trim_start_matches("sha256:");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "--digest {given}: want sha256:HEX (64 hex digits) or the file holding it"
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// One resource per file: the header comments, then the resource as JSON, which every YAML
/// parser reads the same way (no YAML 1.1 surprises: a date, `on`, `no` or an octal-looking
/// string stays a string), and `kubectl apply -f` takes as it is.
fn write(dir: &Path, name: &str, head: &str, doc: &Value) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let text = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?;
    let path = dir.join(name);
    std::fs::write(&path, format!("{head}{text}\n"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

fn secret(names: &[String], namespace: &str) -> Value {
    let data: serde_json::Map<String, Value> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                Value::String("replace-with-the-secret (apisec keygen hmac)".into()),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "apisec-secrets", "namespace": namespace},
           "type": "Opaque", "stringData": data})
}

fn env_from_secret(names: &[String]) -> Value {
    Value::Array(
        names
            .iter()
            .map(|n| json!({"name": n, "valueFrom": {"secretKeyRef": {"name": "apisec-secrets", "key": n}}}))
            .collect(),
    )
}

/// The checked-in guard manifest with the fields at these JSON pointers replaced.
fn guard(text: &str, edits: &[(&str, Value)]) -> Result<Value, String> {
    let mut doc: Value =
        serde_norway::from_str(text).map_err(|e| format!("guard manifest: {e}"))?;
    for (pointer, value) in edits {
        *doc.pointer_mut(pointer)
            .ok_or_else(|| format!("guard manifest: no {pointer}"))? = value.clone();
    }
    Ok(doc)
}

const SECRET_NOTE: &str =
    "# Fill in each value (apisec keygen hmac) and keep this file out of version control, or\n\
     # create the Secret from your secret store with these keys.\n";

fn istio(a: &IstioArgs) -> Result<(), String> {
    let (policy, names, digest) = checked(&a.common)?;
    let out = &a.common.out;
    let ns = a.namespace.as_str();
    let head = "# Rendered by `apisec render istio` from the policy; docs/operators.md \"Istio and Envoy Gateway from the policy\".\n";
    let env: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "valueFrom": "HOST"}))
        .collect();
    write(
        out,
        "wasmplugin.yaml",
        head,
        &json!({
            "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": {"name": "apisec", "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"istio": a.selector}},
                "url": format!("oci://{}", a.common.image), "sha256": digest,
                "imagePullPolicy": "IfNotPresent", "pluginName": "apisec",
                "phase": "AUTHN", "priority": 1000, "failStrategy": "FAIL_CLOSE", "type": "HTTP",
                "vmConfig": {"env": env}, "pluginConfig": policy,
            }
        }),
    )?;
    let guard_doc = guard(
        ISTIO_GUARD,
        &[
            ("/metadata/namespace", json!(ns)),
            (
                "/spec/workloadSelector/labels",
                json!({"istio": a.selector}),
            ),
        ],
    )?;
    write(out, "apisec-guard.yaml", head, &guard_doc)?;
    write(
        out,
        "audit-telemetry.yaml",
        head,
        &json!({
            "apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
            "metadata": {"name": "apisec-audit", "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"istio": a.selector}},
                "accessLogging": [{"providers": [{"name": "apisec-audit"}], "filter": {"expression": AUDIT_MATCH}}],
            }
        }),
    )?;
    write(out, "mesh-config.yaml",
        "# Rendered by `apisec render istio`. Not a resource: merge into the mesh config (IstioOperator\n\
         # spec.meshConfig, or istiod's Helm value meshConfig) so that the Telemetry above can name the\n\
         # provider. The audit records go to the proxy's standard output, one sealed JSON object a line,\n\
         # and Envoy's own log (with the chain's checkpoints) to its standard error: ship both\n\
         # (deploy/logging), and give the checkpoints to `apisec audit verify --checkpoints`.\n",
        &json!({"extensionProviders": [{"name": "apisec-audit", "envoyFileAccessLog": {
            "path": "/dev/stdout", "logFormat": {"text": AUDIT_FORMAT}}}]}))?;
    write(
        out,
        "secret.yaml",
        &format!("{head}{SECRET_NOTE}"),
        &secret(&names, ns),
    )?;
    write(out, "gateway-secret-env.yaml",
        &format!("{head}# A strategic merge patch for the gateway Deployment: kubectl patch deployment {} -n {ns} --patch-file gateway-secret-env.yaml\n", a.gateway),
        &json!({"spec": {"template": {"spec": {"containers": [{"name": "istio-proxy", "env": env_from_secret(&names)}]}}}}))?;
    Ok(())
}

fn envoy_gateway(a: &EnvoyGatewayArgs) -> Result<(), String> {
    let (policy, names, digest) = checked(&a.common)?;
    let out = &a.common.out;
    let ns = a.namespace.as_str();
    let sys = a.system_namespace.as_str();
    let head = "# Rendered by `apisec render envoy-gateway` from the policy; docs/operators.md \"Istio and Envoy Gateway from the policy\".\n";
    let target =
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": a.gateway}]);
    write(
        out,
        "envoy-extension-policy.yaml",
        head,
        &json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyExtensionPolicy",
            "metadata": {"name": "apisec", "namespace": ns},
            "spec": {"targetRefs": target, "wasm": [{
                "name": "apisec", "rootID": "apisec", "failOpen": false,
                "code": {"type": "Image", "image": {"url": a.common.image, "sha256": digest}},
                "env": {"hostKeys": names}, "config": policy,
            }]}
        }),
    )?;
    let listener = format!("{ns}/{}/{}", a.gateway, a.listener);
    let guard_doc = guard(
        EG_GUARD,
        &[
            ("/metadata/namespace", json!(ns)),
            ("/spec/targetRef/name", json!(a.gateway)),
            ("/spec/jsonPatches/0/name", json!(listener)),
        ],
    )?;
    write(out, "apisec-guard.yaml", head, &guard_doc)?;
    write(out, "envoy-proxy.yaml",
        &format!("{head}# Reference it from the GatewayClass (spec.parametersRef) or the Gateway (spec.infrastructure.parametersRef).\n"),
        &json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyProxy",
        "metadata": {"name": "apisec-proxy", "namespace": sys},
        "spec": {
            "provider": {"type": "Kubernetes", "kubernetes": {"envoyDeployment": {"container": {"env": env_from_secret(&names)}}}},
            "telemetry": {"accessLog": {"settings": [
                // the audit log: the filter's sealed records only, as they are
                {"format": {"type": "Text", "text": AUDIT_FORMAT}, "matches": [AUDIT_MATCH],
                 "sinks": [{"type": "File", "file": {"path": "/dev/stdout"}}]},
                // requests the filter never saw (codec errors, the guard's refusals): Envoy's own
                {"format": {"type": "JSON", "json": {
                    "source": "envoy", "status": "%RESPONSE_CODE%", "details": "%RESPONSE_CODE_DETAILS%",
                    "flags": "%RESPONSE_FLAGS%", "duration_ms": "%DURATION%", "upstream": "%UPSTREAM_HOST%",
                    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}},
                 "matches": [format!("!({AUDIT_MATCH})")],
                 "sinks": [{"type": "File", "file": {"path": "/dev/stderr"}}]},
            ]}},
        }
    }))?;
    write(
        out,
        "secret.yaml",
        &format!("{head}{SECRET_NOTE}"),
        &secret(&names, sys),
    )?;
    write(out, "backend-traffic-policy.yaml",
        &format!("{head}# What the filter does not do: a bounded wait for the backend and circuit breaking, so that a\n\
                  # slow backend cannot hold the gateway's connections (MON-11). Adjust to the backend's capacity.\n"),
        &json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "BackendTrafficPolicy",
        "metadata": {"name": "apisec-backend", "namespace": ns},
        "spec": {
            "targetRefs": target,
            "timeout": {"http": {"requestTimeout": "15s"}},
            "circuitBreaker": {"maxConnections": 1024, "maxPendingRequests": 1024, "maxParallelRequests": 1024},
        }
    }))?;
    Ok(())
}
