package capture

import "testing"

// BenchmarkApply measures installing a pod's capture (what CNI ADD spends in this package) into
// a fresh network namespace, IPv4-only and dual-stack, with the nft backend.
//
//	go test -run '^$' -bench Apply -benchtime 30x ./pkg/capture/
func BenchmarkApply(b *testing.B) {
	for _, tc := range []struct {
		name      string
		dualStack bool
	}{{"ipv4", false}, {"dual_stack", true}} {
		b.Run(tc.name, func(b *testing.B) {
			needRoot(b)
			c := podConfig(NFT, tc.dualStack)
			for b.Loop() {
				b.StopTimer()
				_, path := newNetns(b)
				b.StartTimer()
				if err := Apply(path, c); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
