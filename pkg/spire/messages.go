package spire

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// The messages of the Delegated Identity API that the source sends and reads, encoded by hand
// with protowire rather than with spire-api-sdk's generated types: those register every SPIRE
// API type (and, through the generated service, gRPC) at start-up, which costs every daemon
// megabytes of resident memory, SPIRE or not. The field numbers are those of
// spire/api/agent/delegatedidentity/v1/delegatedidentity.proto and spire/api/types/*.proto
// (spire-api-sdk v1.13); the tests check them against the generated types.

// selector is spire.api.types.Selector.
type selector struct{ typ, value string }

// x509SVIDWithKey is spire.api.agent.delegatedidentity.v1.X509SVIDWithKey, flattened: the
// SVID's SPIFFE ID, its certificate chain (leaf first, DER) and its private key (PKCS#8 DER).
type x509SVIDWithKey struct {
	id        string
	certChain [][]byte
	key       []byte
}

// Field numbers.
const (
	// SubscribeToX509SVIDsRequest
	fieldRequestSelectors protowire.Number = 1
	// Selector
	fieldSelectorType  protowire.Number = 1
	fieldSelectorValue protowire.Number = 2
	// SubscribeToX509SVIDsResponse
	fieldResponseSVIDs protowire.Number = 1
	// X509SVIDWithKey
	fieldSVIDWithKeySVID protowire.Number = 1
	fieldSVIDWithKeyKey  protowire.Number = 2
	// X509SVID
	fieldSVIDCertChain protowire.Number = 1
	fieldSVIDID        protowire.Number = 2
	// SPIFFEID
	fieldIDTrustDomain protowire.Number = 1
	fieldIDPath        protowire.Number = 2
	// SubscribeToX509BundlesResponse
	fieldBundlesCACertificates protowire.Number = 1
	// a map entry
	fieldMapKey   protowire.Number = 1
	fieldMapValue protowire.Number = 2
)

// marshalSVIDsRequest encodes a SubscribeToX509SVIDsRequest with the selectors (and no pid: the
// pods are selected by their Kubernetes selectors, not by a process).
func marshalSVIDsRequest(sel []selector) []byte {
	var b []byte
	for _, s := range sel {
		var m []byte
		m = protowire.AppendTag(m, fieldSelectorType, protowire.BytesType)
		m = protowire.AppendString(m, s.typ)
		m = protowire.AppendTag(m, fieldSelectorValue, protowire.BytesType)
		m = protowire.AppendString(m, s.value)
		b = protowire.AppendTag(b, fieldRequestSelectors, protowire.BytesType)
		b = protowire.AppendBytes(b, m)
	}
	return b
}

// unmarshalSVIDsResponse decodes the SVIDs of a SubscribeToX509SVIDsResponse.
func unmarshalSVIDsResponse(b []byte) ([]x509SVIDWithKey, error) {
	var out []x509SVIDWithKey
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if num != fieldResponseSVIDs || typ != protowire.BytesType {
			return nil
		}
		x, err := unmarshalSVIDWithKey(v)
		if err != nil {
			return err
		}
		out = append(out, x)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("X.509-SVID update: %w", err)
	}
	return out, nil
}

func unmarshalSVIDWithKey(b []byte) (x509SVIDWithKey, error) {
	var x x509SVIDWithKey
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case fieldSVIDWithKeySVID:
			return eachField(v, func(num protowire.Number, typ protowire.Type, v []byte) error {
				if typ != protowire.BytesType {
					return nil
				}
				switch num {
				case fieldSVIDCertChain:
					x.certChain = append(x.certChain, v)
				case fieldSVIDID:
					id, err := unmarshalSPIFFEID(v)
					if err != nil {
						return err
					}
					x.id = id
				}
				return nil
			})
		case fieldSVIDWithKeyKey:
			x.key = v
		}
		return nil
	})
	return x, err
}

// unmarshalSPIFFEID decodes a spire.api.types.SPIFFEID into its URI form.
func unmarshalSPIFFEID(b []byte) (string, error) {
	var td, path string
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case fieldIDTrustDomain:
			td = string(v)
		case fieldIDPath:
			path = string(v)
		}
		return nil
	})
	return "spiffe://" + td + path, err
}

// unmarshalBundlesResponse decodes the ca_certificates map of a SubscribeToX509BundlesResponse:
// trust domain ID to its authorities' certificates, concatenated DER.
func unmarshalBundlesResponse(b []byte) (map[string][]byte, error) {
	out := make(map[string][]byte)
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if num != fieldBundlesCACertificates || typ != protowire.BytesType {
			return nil
		}
		var key string
		var value []byte
		if err := eachField(v, func(num protowire.Number, typ protowire.Type, v []byte) error {
			if typ != protowire.BytesType {
				return nil
			}
			switch num {
			case fieldMapKey:
				key = string(v)
			case fieldMapValue:
				value = v
			}
			return nil
		}); err != nil {
			return err
		}
		out[key] = value
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("X.509 bundle update: %w", err)
	}
	return out, nil
}

// eachField calls f with every field of the message b, in order; v is the content of a
// length-delimited field and nil for the others, which callers skip as unknown. A repeated field
// comes as many calls.
func eachField(b []byte, f func(num protowire.Number, typ protowire.Type, v []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		var v []byte
		if typ == protowire.BytesType {
			v, n = protowire.ConsumeBytes(b)
		} else {
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		if err := f(num, typ, v); err != nil {
			return err
		}
	}
	return nil
}
