//go:build national

// The national algorithms for apisec_sign.go (DATA-5), from github.com/tjfoc/gmsm: SM3 for the
// Content-Digest, HMAC-SM3 for S1, SM2 over SM3 for S2/S3 signatures.
package main

import (
	"crypto/hmac"
	"errors"

	"github.com/tjfoc/gmsm/sm2"
	"github.com/tjfoc/gmsm/sm3"
)

func init() {
	national.sm3 = sm3.Sm3Sum
	national.hmac = func(secret, data []byte) []byte {
		mac := hmac.New(sm3.New, secret)
		mac.Write(data)
		return mac.Sum(nil)
	}
	national.sign = signSM2
}

// signSM2 signs data with SM2 over SM3, the Z value taken over the distinguishing ID
// (GB/T 32918, GM/T 0009), and returns r || s, 32 bytes each, as RFC 9421 wants (not DER).
func signSM2(keyPEM []byte, id string, data []byte) ([]byte, error) {
	key, err := sm2.ReadPrivateKeyFromMem(keyPEM, nil) // PKCS#8, as OpenSSL and `apisec keygen sm2` write it
	if err != nil {
		return nil, err
	}
	// gmsm 1.3.0 (Debian's) puts the public Y coordinate into Z without its leading zero bytes:
	// for one key in 256 its Z, and so every signature, would be wrong. Refuse such a key here
	// rather than send signatures the gateway must refuse.
	if len(key.PublicKey.Y.Bytes()) < 32 {
		return nil, errors.New("this SM2 key's Y coordinate starts with a zero byte, which gmsm 1.3.0 hashes wrongly; make another key")
	}
	r, s, err := sm2.Sm2Sign(key, data, []byte(id))
	if err != nil {
		return nil, err
	}
	raw := make([]byte, 64)
	r.FillBytes(raw[:32])
	s.FillBytes(raw[32:])
	return raw, nil
}
