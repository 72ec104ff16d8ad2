package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
type store struct {
	dir string
	// spare holds an empty file made ahead of time for the next save. Creating a file costs a
	// new inode, which on a busy ext4 is a search of the inode tables (a good part of a
	// millisecond, more than the rest of an enrollment); the spare moves that search out of
	// the pod's CNI ADD.
	spare chan *os.File
	// making counts the spares being made in the background; mu and closed stop new ones once
	// close waits for them.
	making sync.WaitGroup
	mu     sync.Mutex
	closed bool
}

// sparePrefix starts the names of files being written; load ignores them.
const sparePrefix = ".pod-"

func newStore(stateDir string) (*store, error) {
	dir := filepath.Join(stateDir, "pods")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	// Files being written when a previous daemon stopped were never records.
	if old, err := filepath.Glob(filepath.Join(dir, sparePrefix+"*")); err == nil {
		for _, f := range old {
			_ = os.Remove(f)
		}
	}
	s := &store{dir: dir, spare: make(chan *os.File, 1)}
	s.makeSpare()
	return s, nil
}

// makeSpare creates the spare file, unless there is one; a failure is left to the next save,
// which then creates its file itself and reports why it could not.
func (s *store) makeSpare() {
	f, err := os.CreateTemp(s.dir, sparePrefix+"*")
	if err != nil {
		return
	}
	select {
	case s.spare <- f:
	default:
		f.Close()
		os.Remove(f.Name())
	}
}

// tempFile returns an empty file to write a record in, and makes the next one in the background.
func (s *store) tempFile() (*os.File, error) {
	select {
	case f := <-s.spare:
		s.mu.Lock()
		if !s.closed {
			s.making.Go(s.makeSpare)
		}
		s.mu.Unlock()
		return f, nil
	default:
		return os.CreateTemp(s.dir, sparePrefix+"*")
	}
}

// close waits for the spare being made, if any, and makes no more: nothing writes in the directory
// once it returns. Saves still work, creating their files themselves.
func (s *store) close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.making.Wait()
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
	tmp, err := s.tempFile()
	if err == nil {
		err = s.place(tmp, data, r.Enrollment.Pod.ContainerID)
		if errors.Is(err, fs.ErrNotExist) {
			// The spare was removed under us (a daemon starting on the same directory
			// clears them): write a file of our own.
			if tmp, err = os.CreateTemp(s.dir, sparePrefix+"*"); err == nil {
				err = s.place(tmp, data, r.Enrollment.Pod.ContainerID)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("save pod state: %w", err)
	}
	return nil
}

// place writes data in tmp, closes it and renames it to the record of containerID.
func (s *store) place(tmp *os.File, data []byte, containerID string) error {
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), s.path(containerID))
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
