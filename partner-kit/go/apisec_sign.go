// Signing a request for an apisec gateway, in Go (standard library only; the national
// algorithms in national.go, with tjfoc/gmsm). RFC 9421 HTTP Message Signatures with an RFC 9530
// Content-Digest.
//
//	go run apisec_sign.go send -url https://gw.example.com/api/v1/info/research/r-1 \
//	    -app APP_ID -keyid KEY_ID -secret-b64 APP_SECRET [-ca ca.pem]
//	go run apisec_sign.go send -url https://gw.example.com/api/v1/orders -method POST \
//	    -data '{"symbol":"600000","side":"buy","qty":100}' -app APP_ID -keyid KEY_ID -key app.key.pem
//	go run apisec_sign.go vectors ../../vectors/signing.json   # check against the test vectors
//
// National algorithms (DATA-5; the gateway's docs/national.md): -alg hmac-sm3 (with -secret-b64)
// or -alg sm2-sm3 (with -key sm2.key.pem, and -sm2-id ID when your key was registered with an ID
// other than the default 1234567812345678); a body then carries an sm3 Content-Digest. They come
// from github.com/tjfoc/gmsm, built in with national.go:
//
//	go run -tags national apisec_sign.go national.go send ... -alg sm2-sm3 -key sm2.key.pem
//	go run -tags national apisec_sign.go national.go vectors ../../vectors/national.json
//
// (Debian's golang-github-tjfoc-gmsm-dev: GO111MODULE=off GOPATH=/usr/share/gocode; in a module,
// `go get github.com/tjfoc/gmsm`.)
//
// Sessions (SES-1) and user-bound APIs (ID-4): establish by POSTing
// {"caller_code":"APP_ID","mac":"AA-BB-CC-DD-EE-01"} to /apisec/v1/sessions, then add
// -session SESSION_ID -mac AA-BB-CC-DD-EE-01 (and -sdk VERSION) to every later call:
// x-session-id, x-device-mac and x-sdk-version are sent and covered by the signature.
//
// What the gateway expects: x-app-id; with a body, content-type and content-digest
// (sha-256=:<base64>:); covered components "@method" "@authority" "@path" "@query" "x-app-id"
// (+ "content-digest"), in this order; parameters created, nonce, keyid, alg.
package main

import (
	"crypto/ecdsa"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

type header struct{ name, value string }

const sm2DefaultID = "1234567812345678" // GB/T 32918 / GM/T 0009's default distinguishing ID

// national: SM3, HMAC-SM3 and SM2 over SM3, filled in by national.go when it is built in.
var national struct {
	sm3  func(data []byte) []byte
	hmac func(secret, data []byte) []byte
	sign func(keyPEM []byte, id string, data []byte) ([]byte, error)
}

var errNoNational = errors.New("the national algorithms need national.go: go run -tags national apisec_sign.go national.go ...")

// contentDigest is the RFC 9530 Content-Digest: sha-256, or sm3 with the national algorithms.
func contentDigest(body []byte, alg string) (string, error) {
	if alg == "hmac-sm3" || alg == "sm2-sm3" {
		if national.sm3 == nil {
			return "", errNoNational
		}
		return "sm3=:" + base64.StdEncoding.EncodeToString(national.sm3(body)) + ":", nil
	}
	sum := sha256.Sum256(body)
	return "sha-256=:" + base64.StdEncoding.EncodeToString(sum[:]) + ":", nil
}

// authority is host[:port] as the HTTP client sends it: the port only when not the default.
func authority(u *url.URL) string {
	host, port := strings.ToLower(u.Hostname()), u.Port()
	if port == "" || (u.Scheme == "https" && port == "443") || (u.Scheme == "http" && port == "80") {
		return host
	}
	return host + ":" + port
}

// signatureParts returns the headers to send before the signature, the Signature-Input value
// and the signature base, exactly as the gateway rebuilds them.
// extra: more headers to send and cover (the session, the device MAC, the SDK version).
func signatureParts(method, rawURL, app string, body []byte, keyid, alg string, created int64, nonce string, extra []header) ([]header, string, string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, "", "", err
	}
	headers := append([]header{{"x-app-id", app}}, extra...)
	components := []string{"@method", "@authority", "@path", "@query", "x-app-id"}
	for _, h := range extra {
		components = append(components, h.name)
	}
	if len(body) > 0 {
		digest, err := contentDigest(body, alg)
		if err != nil {
			return nil, "", "", err
		}
		headers = append(headers, header{"content-type", "application/json"}, header{"content-digest", digest})
		components = append(components, "content-digest")
	}
	quoted := make([]string, len(components))
	for i, c := range components {
		quoted[i] = `"` + c + `"`
	}
	params := fmt.Sprintf(`(%s);created=%d;nonce="%s";keyid="%s";alg="%s"`, strings.Join(quoted, " "), created, nonce, keyid, alg)
	path := u.EscapedPath()
	if path == "" {
		path = "/"
	}
	values := map[string]string{
		"@method": strings.ToUpper(method), "@authority": authority(u), "@path": path, "@query": "?" + u.RawQuery,
	}
	for _, h := range headers {
		values[h.name] = h.value
	}
	var b strings.Builder
	for _, c := range components {
		fmt.Fprintf(&b, "\"%s\": %s\n", c, values[c])
	}
	b.WriteString(`"@signature-params": ` + params)
	return headers, "sig1=" + params, b.String(), nil
}

func signBase(base, alg, secretB64 string, keyPEM []byte, sm2ID string) (string, error) {
	var raw []byte
	if (alg == "hmac-sm3" || alg == "sm2-sm3") && national.sign == nil {
		return "", errNoNational
	}
	if alg == "hmac-sha256" || alg == "hmac-sm3" {
		secret, err := base64.StdEncoding.DecodeString(secretB64)
		if err != nil {
			return "", err
		}
		if alg == "hmac-sm3" {
			raw = national.hmac(secret, []byte(base))
		} else {
			mac := hmac.New(sha256.New, secret)
			mac.Write([]byte(base))
			raw = mac.Sum(nil)
		}
	} else if alg == "sm2-sm3" {
		var err error
		if raw, err = national.sign(keyPEM, sm2ID, []byte(base)); err != nil {
			return "", err
		}
	} else {
		block, _ := pem.Decode(keyPEM)
		if block == nil {
			return "", errors.New("no PEM key")
		}
		parsed, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return "", err
		}
		key, ok := parsed.(*ecdsa.PrivateKey)
		if !ok {
			return "", errors.New("not an EC key")
		}
		digest := sha256.Sum256([]byte(base))
		r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
		if err != nil {
			return "", err
		}
		raw = make([]byte, 64) // RFC 9421: r || s, 32 bytes each, not DER
		r.FillBytes(raw[:32])
		s.FillBytes(raw[32:])
	}
	return "sig1=:" + base64.StdEncoding.EncodeToString(raw) + ":", nil
}

func send(args []string) error {
	fs := flag.NewFlagSet("send", flag.ExitOnError)
	target := fs.String("url", "", "")
	method := fs.String("method", "", "")
	data := fs.String("data", "", "")
	app := fs.String("app", "", "")
	keyid := fs.String("keyid", "", "")
	secret := fs.String("secret-b64", "", "")
	keyFile := fs.String("key", "", "")
	algFlag := fs.String("alg", "", "")
	sm2ID := fs.String("sm2-id", sm2DefaultID, "")
	ca := fs.String("ca", "", "")
	session := fs.String("session", "", "")
	mac := fs.String("mac", "", "")
	sdk := fs.String("sdk", "", "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var extra []header
	for _, h := range []header{{"x-session-id", *session}, {"x-device-mac", *mac}, {"x-sdk-version", *sdk}} {
		if h.value != "" {
			extra = append(extra, h)
		}
	}
	body := []byte(*data)
	if *method == "" {
		*method = "GET"
		if len(body) > 0 {
			*method = "POST"
		}
	}
	alg, keyPEM := "hmac-sha256", []byte(nil)
	if *keyFile != "" {
		alg = "ecdsa-p256-sha256"
		var err error
		if keyPEM, err = os.ReadFile(*keyFile); err != nil {
			return err
		}
	}
	if *algFlag != "" {
		alg = *algFlag
	}
	nb := make([]byte, 18)
	if _, err := rand.Read(nb); err != nil {
		return err
	}
	headers, input, base, err := signatureParts(*method, *target, *app, body, *keyid, alg, time.Now().Unix(), base64.RawURLEncoding.EncodeToString(nb), extra)
	if err != nil {
		return err
	}
	sig, err := signBase(base, alg, *secret, keyPEM, *sm2ID)
	if err != nil {
		return err
	}
	req, err := http.NewRequest(*method, *target, strings.NewReader(string(body)))
	if err != nil {
		return err
	}
	for _, h := range append(headers, header{"signature-input", input}, header{"signature", sig}) {
		req.Header.Set(h.name, h.value)
	}
	client := &http.Client{Timeout: 10 * time.Second}
	if *ca != "" {
		pemCA, err := os.ReadFile(*ca)
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pemCA)
		client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	fmt.Printf("%d\n%s\n", resp.StatusCode, out)
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		os.Exit(1)
	}
	return nil
}

type vectorDoc struct {
	AppID string                       `json:"app_id"`
	Keys  map[string]map[string]string `json:"keys"`
	Cases []struct {
		Name    string `json:"name"`
		Key     string `json:"key"`
		Request struct {
			Method string `json:"method"`
			URL    string `json:"url"`
			Body   string `json:"body"`
		} `json:"request"`
		Params struct {
			Created int64  `json:"created"`
			Nonce   string `json:"nonce"`
			Keyid   string `json:"keyid"`
			Alg     string `json:"alg"`
		} `json:"params"`
	} `json:"cases"`
}

func vectors(path string) error {
	text, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc vectorDoc
	if err := json.Unmarshal(text, &doc); err != nil {
		return err
	}
	for _, c := range doc.Cases {
		key := doc.Keys[c.Key]
		var keyPEM []byte
		if f, ok := key["private_key_file"]; ok {
			if keyPEM, err = os.ReadFile(filepath.Join(filepath.Dir(path), f)); err != nil {
				return err
			}
		}
		headers, input, base, err := signatureParts(c.Request.Method, c.Request.URL, doc.AppID, []byte(c.Request.Body), c.Params.Keyid, c.Params.Alg, c.Params.Created, c.Params.Nonce, nil)
		if err != nil {
			return err
		}
		sig, err := signBase(base, c.Params.Alg, key["secret_b64"], keyPEM, key["sm2_id"])
		if err != nil {
			return err
		}
		var digest interface{}
		for _, h := range headers {
			if h.name == "content-digest" {
				digest = h.value
			}
		}
		line, _ := json.Marshal(map[string]interface{}{
			"name": c.Name, "content-digest": digest, "signature-input": input, "signature_base": base, "signature": sig,
		})
		fmt.Println(string(line))
	}
	return nil
}

func main() {
	var err error
	switch {
	case len(os.Args) == 3 && os.Args[1] == "vectors":
		err = vectors(os.Args[2])
	case len(os.Args) > 1 && os.Args[1] == "send":
		err = send(os.Args[2:])
	default:
		err = errors.New("usage: apisec_sign (send -url URL -app APP -keyid KEYID (-secret-b64 S | -key PEM) [-alg hmac-sm3|sm2-sm3 [-sm2-id ID]] [-method M] [-data BODY] [-ca CA] | vectors FILE)")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
