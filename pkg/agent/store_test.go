package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/meshless/meshless/pkg/enroll"
)

func spares(t *testing.T, s *store) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(s.dir, sparePrefix+"*"))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

func testRecord(id string) record {
	return record{Enrollment: enroll.Enrollment{Pod: enroll.Pod{ContainerID: id, Name: "p", Namespace: "ns"}}, ServiceAccount: "sa"}
}

// A save writes into the spare file made ahead of time, and the record is complete.
func TestStoreSavesIntoTheSpare(t *testing.T) {
	s, err := newStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	before := spares(t, s)
	if len(before) != 1 {
		t.Fatalf("spare files after newStore: %q, want one", before)
	}
	if err := s.save(testRecord("c1")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(before[0]); !os.IsNotExist(err) {
		t.Errorf("the spare %s is still there after the save (%v): the save did not use it", before[0], err)
	}
	records, errs := s.load()
	if len(errs) != 0 || len(records) != 1 || records[0].Enrollment.Pod.ContainerID != "c1" || records[0].ServiceAccount != "sa" {
		t.Errorf("load = %+v, %v; want the record of c1", records, errs)
	}
}

// A daemon starting on the directory clears the spares left behind; one whose spare was cleared
// under it still saves.
func TestStoreSpareRemovedUnderIt(t *testing.T) {
	dir := t.TempDir()
	first, err := newStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	leftover := spares(t, first)
	defer first.close()
	second, err := newStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer second.close()
	for _, f := range leftover {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("leftover spare %s not cleared by the new store (%v)", f, err)
		}
	}
	if n := len(spares(t, second)); n != 1 {
		t.Errorf("%d spare files, want the new store's one", n)
	}
	if err := first.save(testRecord("c2")); err != nil {
		t.Fatalf("save with a cleared spare: %v", err)
	}
	records, errs := second.load()
	if len(errs) != 0 || len(records) != 1 || records[0].Enrollment.Pod.ContainerID != "c2" {
		t.Errorf("load = %+v, %v; want the record of c2", records, errs)
	}
}
