// Signing a request for an apisec gateway, in Java 11+ (JDK only; the national algorithms need
// BouncyCastle's bcprov on the class path). RFC 9421 HTTP Message Signatures with an RFC 9530
// Content-Digest.
//
//   java ApisecSign.java send --url https://gw.example.com/api/v1/info/research/r-1 \
//       --app APP_ID --keyid KEY_ID --secret-b64 APP_SECRET [--ca ca.pem]
//   java ApisecSign.java send --url https://gw.example.com/api/v1/orders --method POST \
//       --data '{"symbol":"600000","side":"buy","qty":100}' --app APP_ID --keyid KEY_ID --key app.key.pem
//   java ApisecSign.java vectors ../../vectors/signing.json   # check against the test vectors
//
// National algorithms (DATA-5; the gateway's docs/national.md): add --alg hmac-sm3 (with
// --secret-b64) or --alg sm2-sm3 (with --key sm2.key.pem, and --sm2-id ID when your key was
// registered with an ID other than the default 1234567812345678); a body then carries an sm3
// Content-Digest. The JDK has neither SM2 nor SM3: run with BouncyCastle (Debian's
// libbcprov-java, or org.bouncycastle:bcprov-jdk18on), found by name so that the other
// algorithms need nothing beyond the JDK:
//   java -cp /usr/share/java/bcprov.jar ApisecSign.java send ... --alg sm2-sm3 --key sm2.key.pem
//   java -cp /usr/share/java/bcprov.jar ApisecSign.java vectors ../../vectors/national.json
//
// Sessions (SES-1) and user-bound APIs (ID-4): establish by POSTing
// {"caller_code":"APP_ID","mac":"AA-BB-CC-DD-EE-01"} to /apisec/v1/sessions, then add
// --session SESSION_ID --mac AA-BB-CC-DD-EE-01 (and --sdk VERSION) to every later call:
// x-session-id, x-device-mac and x-sdk-version are sent and covered by the signature.
//
// What the gateway expects: x-app-id; with a body, content-type and content-digest
// (sha-256=:<base64>:); covered components "@method" "@authority" "@path" "@query" "x-app-id"
// (+ "content-digest"), in this order; parameters created, nonce, keyid, alg.
// ECDSA: "SHA256withECDSAinP1363Format" gives r || s, which RFC 9421 wants (not DER).

import java.io.ByteArrayInputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.MessageDigest;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.SecureRandom;
import java.security.Signature;
import java.security.cert.CertificateFactory;
import java.security.spec.AlgorithmParameterSpec;
import java.security.spec.PKCS8EncodedKeySpec;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class ApisecSign {
    /** The headers to send before the signature, the Signature-Input value and the signature base. */
    record Parts(LinkedHashMap<String, String> headers, String signatureInput, String base) {}

    static final String SM2_DEFAULT_ID = "1234567812345678"; // GB/T 32918 / GM/T 0009's default
    static Provider bc;

    /** BouncyCastle, loaded by name the first time SM2 or SM3 is needed. */
    static Provider bouncyCastle() throws Exception {
        if (bc == null) {
            try {
                bc = (Provider) Class.forName("org.bouncycastle.jce.provider.BouncyCastleProvider")
                    .getDeclaredConstructor().newInstance();
            } catch (ClassNotFoundException e) {
                throw new IllegalStateException("SM2 and SM3 need BouncyCastle: java -cp bcprov.jar ApisecSign.java ...");
            }
        }
        return bc;
    }

    static boolean national(String alg) {
        return alg.equals("hmac-sm3") || alg.equals("sm2-sm3");
    }

    /** RFC 9530 Content-Digest: sha-256, or sm3 (the national hash) with the national algorithms. */
    static String contentDigest(byte[] body, String alg) throws Exception {
        if (national(alg)) {
            byte[] sum = MessageDigest.getInstance("SM3", bouncyCastle()).digest(body);
            return "sm3=:" + Base64.getEncoder().encodeToString(sum) + ":";
        }
        byte[] sum = MessageDigest.getInstance("SHA-256").digest(body);
        return "sha-256=:" + Base64.getEncoder().encodeToString(sum) + ":";
    }

    /** An ASN.1 ECDSA-Sig-Value (SEQUENCE of two INTEGERs, what BouncyCastle's SM2 writes) as r || s. */
    static byte[] derToRaw(byte[] der) {
        byte[] out = new byte[64];
        int i = der[1] < 0 ? 3 : 2; // skip the SEQUENCE header (a one-byte long form past 127 bytes)
        for (int part = 0; part < 2; part++) {
            if (der[i] != 2) throw new IllegalArgumentException("not an ECDSA-Sig-Value");
            int n = der[i + 1];
            int skip = Math.max(0, n - 32); // a leading zero byte keeps the INTEGER positive
            System.arraycopy(der, i + 2 + skip, out, part * 32 + 32 - (n - skip), n - skip);
            i += 2 + n;
        }
        return out;
    }

    /** host[:port] as the HTTP client sends it: the port only when not the default. */
    static String authority(URI u) {
        String host = u.getHost().toLowerCase();
        int port = u.getPort();
        boolean dflt = port == -1 || ("https".equals(u.getScheme()) && port == 443) || ("http".equals(u.getScheme()) && port == 80);
        return dflt ? host : host + ":" + port;
    }

    // extra: more headers to send and cover (the session, the device MAC, the SDK version).
    static Parts signatureParts(String method, String url, String app, byte[] body, String keyid, String alg,
                                long created, String nonce, Map<String, String> extra) throws Exception {
        URI u = URI.create(url);
        LinkedHashMap<String, String> headers = new LinkedHashMap<>();
        headers.put("x-app-id", app);
        headers.putAll(extra);
        List<String> components = new ArrayList<>(List.of("@method", "@authority", "@path", "@query", "x-app-id"));
        components.addAll(extra.keySet());
        if (body.length > 0) {
            headers.put("content-type", "application/json");
            headers.put("content-digest", contentDigest(body, alg));
            components.add("content-digest");
        }
        StringBuilder params = new StringBuilder("(");
        for (int i = 0; i < components.size(); i++) {
            params.append(i == 0 ? "" : " ").append('"').append(components.get(i)).append('"');
        }
        params.append(");created=").append(created).append(";nonce=\"").append(nonce)
              .append("\";keyid=\"").append(keyid).append("\";alg=\"").append(alg).append('"');
        Map<String, String> values = new HashMap<>(headers);
        values.put("@method", method.toUpperCase());
        values.put("@authority", authority(u));
        String path = u.getRawPath();
        values.put("@path", path == null || path.isEmpty() ? "/" : path);
        values.put("@query", "?" + (u.getRawQuery() == null ? "" : u.getRawQuery()));
        StringBuilder base = new StringBuilder();
        for (String c : components) {
            base.append('"').append(c).append("\": ").append(values.get(c)).append('\n');
        }
        base.append("\"@signature-params\": ").append(params);
        return new Parts(headers, "sig1=" + params, base.toString());
    }

    static String signBase(String base, String alg, String secretB64, String keyPem, String sm2Id) throws Exception {
        byte[] raw;
        byte[] data = base.getBytes(StandardCharsets.UTF_8);
        if (alg.equals("hmac-sha256")) {
            Mac mac = Mac.getInstance("HmacSHA256");
            mac.init(new SecretKeySpec(Base64.getDecoder().decode(secretB64), "HmacSHA256"));
            raw = mac.doFinal(data);
        } else if (alg.equals("hmac-sm3")) {
            Mac mac = Mac.getInstance("HMACSM3", bouncyCastle());
            mac.init(new SecretKeySpec(Base64.getDecoder().decode(secretB64), "HMACSM3"));
            raw = mac.doFinal(data);
        } else if (alg.equals("sm2-sm3")) {
            String b64 = keyPem.replaceAll("-----[A-Z ]+-----", "").replaceAll("\\s", "");
            PrivateKey key = KeyFactory.getInstance("EC", bouncyCastle())
                .generatePrivate(new PKCS8EncodedKeySpec(Base64.getDecoder().decode(b64)));
            Signature s = Signature.getInstance("SM3withSM2", bouncyCastle());
            // The distinguishing ID goes into the Z value (GM/T 0009); BouncyCastle's SM2ParameterSpec.
            s.setParameter((AlgorithmParameterSpec) Class.forName("org.bouncycastle.jcajce.spec.SM2ParameterSpec")
                .getConstructor(byte[].class).newInstance((Object) sm2Id.getBytes(StandardCharsets.UTF_8)));
            s.initSign(key);
            s.update(data);
            raw = derToRaw(s.sign());
        } else {
            String b64 = keyPem.replaceAll("-----[A-Z ]+-----", "").replaceAll("\\s", "");
            PrivateKey key = KeyFactory.getInstance("EC").generatePrivate(new PKCS8EncodedKeySpec(Base64.getDecoder().decode(b64)));
            Signature s = Signature.getInstance("SHA256withECDSAinP1363Format");
            s.initSign(key);
            s.update(data);
            raw = s.sign();
        }
        return "sig1=:" + Base64.getEncoder().encodeToString(raw) + ":";
    }

    static int send(Map<String, String> a) throws Exception {
        byte[] body = a.getOrDefault("data", "").getBytes(StandardCharsets.UTF_8);
        String method = a.getOrDefault("method", body.length > 0 ? "POST" : "GET");
        String alg = a.getOrDefault("alg", a.containsKey("key") ? "ecdsa-p256-sha256" : "hmac-sha256");
        byte[] nb = new byte[18];
        new SecureRandom().nextBytes(nb);
        String nonce = Base64.getUrlEncoder().withoutPadding().encodeToString(nb);
        LinkedHashMap<String, String> extra = new LinkedHashMap<>();
        String[][] optional = {{"session", "x-session-id"}, {"mac", "x-device-mac"}, {"sdk", "x-sdk-version"}};
        for (String[] o : optional) {
            if (a.containsKey(o[0])) {
                extra.put(o[1], a.get(o[0]));
            }
        }
        Parts p = signatureParts(method, a.get("url"), a.get("app"), body, a.get("keyid"), alg,
                                 System.currentTimeMillis() / 1000, nonce, extra);
        String keyPem = a.containsKey("key") ? Files.readString(Path.of(a.get("key"))) : null;
        String sig = signBase(p.base(), alg, a.get("secret-b64"), keyPem, a.getOrDefault("sm2-id", SM2_DEFAULT_ID));
        HttpClient.Builder cb = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).version(HttpClient.Version.HTTP_1_1);
        if (a.containsKey("ca")) {
            KeyStore ks = KeyStore.getInstance(KeyStore.getDefaultType());
            ks.load(null, null);
            ks.setCertificateEntry("ca", CertificateFactory.getInstance("X.509")
                .generateCertificate(new ByteArrayInputStream(Files.readAllBytes(Path.of(a.get("ca"))))));
            TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
            tmf.init(ks);
            SSLContext ctx = SSLContext.getInstance("TLS");
            ctx.init(null, tmf.getTrustManagers(), null);
            cb.sslContext(ctx);
        }
        HttpRequest.Builder rb = HttpRequest.newBuilder(URI.create(a.get("url"))).timeout(Duration.ofSeconds(10))
            .method(method, body.length > 0 ? HttpRequest.BodyPublishers.ofByteArray(body) : HttpRequest.BodyPublishers.noBody());
        p.headers().forEach(rb::header);
        rb.header("signature-input", p.signatureInput());
        rb.header("signature", sig);
        HttpResponse<String> resp = cb.build().send(rb.build(), HttpResponse.BodyHandlers.ofString());
        System.out.println(resp.statusCode());
        System.out.println(resp.body());
        return resp.statusCode() >= 200 && resp.statusCode() < 300 ? 0 : 1;
    }

    // The vectors file is read with a few regular expressions (the JDK has no JSON parser).
    static String field(String obj, String name) {
        Matcher m = Pattern.compile("\"" + Pattern.quote(name) + "\"\\s*:\\s*(\"((?:[^\"\\\\]|\\\\.)*)\"|(-?\\d+))").matcher(obj);
        if (!m.find()) return null;
        return m.group(2) != null ? unescape(m.group(2)) : m.group(3);
    }

    static String unescape(String s) {
        StringBuilder out = new StringBuilder();
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c != '\\') { out.append(c); continue; }
            char n = s.charAt(++i);
            switch (n) {
                case 'n' -> out.append('\n');
                case 't' -> out.append('\t');
                case 'u' -> { out.append((char) Integer.parseInt(s.substring(i + 1, i + 5), 16)); i += 4; }
                default -> out.append(n);
            }
        }
        return out.toString();
    }

    static String jsonString(String s) {
        if (s == null) return "null";
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                default -> out.append(c);
            }
        }
        return out.append('"').toString();
    }

    static int vectors(String file) throws Exception {
        String doc = Files.readString(Path.of(file));
        String app = field(doc, "app_id");
        int keysAt = doc.indexOf("\"keys\"");
        String[] cases = doc.substring(doc.indexOf("\"cases\""), keysAt).split("\\{\\s*\"expected\"");
        for (int i = 1; i < cases.length; i++) {
            String c = cases[i];
            String params = c.substring(c.indexOf("\"params\""));
            String request = c.substring(c.indexOf("\"request\""));
            String alg = field(params, "alg");
            // the case's key: its object under "keys" (the fields in it are sorted by name)
            String key = doc.substring(doc.indexOf("\"" + field(c, "key") + "\"", keysAt));
            String secret = field(key, "secret_b64");
            String keyPem = alg.startsWith("hmac-") ? null
                : Files.readString(Path.of(file).resolveSibling(field(key, "private_key_file")));
            String sm2Id = alg.equals("sm2-sm3") ? field(key, "sm2_id") : null;
            Parts p = signatureParts(field(request, "method"), field(request, "url"), app,
                field(request, "body").getBytes(StandardCharsets.UTF_8), field(params, "keyid"), alg,
                Long.parseLong(field(params, "created")), field(params, "nonce"), new LinkedHashMap<>());
            String sig = signBase(p.base(), alg, secret, keyPem, sm2Id);
            System.out.println("{\"name\":" + jsonString(field(c, "name"))
                + ",\"content-digest\":" + jsonString(p.headers().get("content-digest"))
                + ",\"signature-input\":" + jsonString(p.signatureInput())
                + ",\"signature_base\":" + jsonString(p.base())
                + ",\"signature\":" + jsonString(sig) + "}");
        }
        return 0;
    }

    public static void main(String[] args) throws Exception {
        if (args.length == 2 && args[0].equals("vectors")) {
            System.exit(vectors(args[1]));
        }
        if (args.length > 0 && args[0].equals("send") && args.length % 2 == 1) {
            Map<String, String> a = new HashMap<>();
            for (int i = 1; i < args.length; i += 2) a.put(args[i].replaceFirst("^--", ""), args[i + 1]);
            System.exit(send(a));
        }
        System.err.println("usage: java ApisecSign.java (send --url URL --app APP --keyid KEYID (--secret-b64 S | --key PEM) [--alg hmac-sm3|sm2-sm3 [--sm2-id ID]] [--method M] [--data BODY] [--ca CA] | vectors FILE)");
        System.exit(2);
    }
}
