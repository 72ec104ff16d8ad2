package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/meshless/meshless/pkg/enroll"
)

// record is what survives a daemon restart for one enrolled pod.
type record struct {
	Enrollment enroll.Enrollment `json:"enrollment"`
	// ServiceAccount was resolved at enrollment; a restart reuses it rather than asking again,
	// so a pod's identity never changes under it.
	ServiceAccount string `json:"serviceAccount"`
	// Netns identifies the pod's network namespace itself, not just its path,
	// so that a restart never attaches to a namespace that merely reused the name.
	Netns netnsID `json:"netnsID"`
}

type netnsID struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

func statNetns(path string) (netnsID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return netnsID{}, fmt.Errorf("netns %s: %w", path, err)
	}
	return netnsID{Dev: st.Dev, Ino: st.Ino}, nil
}

// store keeps one JSON file per enrolled pod under dir.
type store struct{ dir string }

func newStore(stateDir string) (*store, error) {
	dir := filepath.Join(stateDir, "pods")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	return &store{dir: dir}, nil
}

func (s *store) path(containerID string) string {
	return filepath.Join(s.dir, containerID+".json")
}

// save writes the record atomically: a daemon that dies leaves the old file or the new one. It
// does not fsync: records only need to outlive the daemon, not the machine, since a machine that
// crashes takes every pod's network namespace with it; an fsync would add milliseconds to every
// pod's CNI ADD.
func (s *store) save(r record) error {
	data, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(s.dir, ".pod-*")
	if err != nil {
		return fmt.Errorf("save pod state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("save pod state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("save pod state: %w", err)
	}
	if err := os.Rename(tmp.Name(), s.path(r.Enrollment.Pod.ContainerID)); err != nil {
		return fmt.Errorf("save pod state: %w", err)
	}
	return nil
}

func (s *store) remove(containerID string) error {
	if err := os.Remove(s.path(containerID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove pod state: %w", err)
	}
	return nil
}

// load returns every readable record; unreadable files are reported, not fatal,
// so one corrupt file never keeps the other pods from coming back.
func (s *store) load() ([]record, []error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, []error{fmt.Errorf("read state dir: %w", err)}
	}
	var (
		records []record
		errs    []error
	)
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(s.dir, name))
		if err != nil {
			errs = append(errs, fmt.Errorf("state %s: %w", name, err))
			continue
		}
		var r record
		if err := json.Unmarshal(data, &r); err != nil {
			errs = append(errs, fmt.Errorf("state %s: %w", name, err))
			continue
		}
		if r.Enrollment.Pod.ContainerID+".json" != name {
			errs = append(errs, fmt.Errorf("state %s: names container %q", name, r.Enrollment.Pod.ContainerID))
			continue
		}
		records = append(records, r)
	}
	return records, errs
}
