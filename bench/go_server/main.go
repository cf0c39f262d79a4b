// Command scalesocket-go is the compiled stand-in for scalesocket.py, used by
// bench/bench.py: the same job as bench/ws_server.py (and of "scalesocket.py
// CMD" in text mode), written the way one would in Go with
// github.com/gorilla/websocket and the standard library:
//
//   - a client connects to ws://HOST:PORT/ROOM; the first client of a room
//     starts one CMD process for it; later clients share it;
//   - each client message is written to the child's stdin followed by "\n";
//   - each line the child prints (up to 32 MiB) is broadcast to every client
//     of the room: framed once (websocket.PreparedMessage), then queued to
//     each client, whose own goroutine writes it, so a slow client holds up
//     no one else (its queue grows, as websockets.broadcast's buffer does);
//   - when the last client leaves, the child is killed and reaped.
//
// No compression, no keepalive pings, a 16 MiB message size limit.
//
//	scalesocket-go --addr 127.0.0.1:0 cat
//
// logs "listening on 127.0.0.1:PORT" on stderr and runs until SIGINT/SIGTERM,
// then closes the connections (1001), kills the children and exits 0.
//
// Built by bench.py (GOPATH mode, Debian's golang-go and
// golang-github-gorilla-websocket-dev) into /tmp/bench-go/scalesocket-go.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

const (
	maxSize   = 16 << 20 // largest client message
	lineLimit = 32 << 20 // longest child line the output pump reads whole
)

var upgrader = websocket.Upgrader{
	// Like websockets' serve(): no Origin check. Read and write buffers are
	// the ones net/http already had for the connection (4 KiB each).
	CheckOrigin: func(*http.Request) bool { return true },
}

var msgBufs = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// client is one connection and the messages queued for it.
type client struct {
	ws      *websocket.Conn
	mu      sync.Mutex
	queue   []*websocket.PreparedMessage
	writing bool // a flush goroutine is running
	dead    bool
}

// send queues a message; a goroutine writes the queue out while it is not
// empty, so an idle client has no writer goroutine.
func (c *client) send(pm *websocket.PreparedMessage) {
	c.mu.Lock()
	if c.dead {
		c.mu.Unlock()
		return
	}
	c.queue = append(c.queue, pm)
	start := !c.writing
	c.writing = true
	c.mu.Unlock()
	if start {
		go c.flush()
	}
}

func (c *client) flush() {
	var batch []*websocket.PreparedMessage
	for {
		c.mu.Lock()
		batch, c.queue = c.queue, batch[:0]
		if len(batch) == 0 || c.dead {
			c.queue, c.writing = nil, false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
		for i, pm := range batch {
			if err := c.ws.WritePreparedMessage(pm); err != nil {
				c.kill() // the reader then sees the connection closed and leaves
				break
			}
			batch[i] = nil
		}
	}
}

// kill drops what is queued and closes the connection.
func (c *client) kill() {
	c.mu.Lock()
	c.dead, c.queue = true, nil
	c.mu.Unlock()
	c.ws.Close()
}

// room is one room: its clients and its child process.
type room struct {
	mu      sync.Mutex // guards clients
	clients map[*client]struct{}
	started chan struct{} // closed once start has run; err, cmd, stdin, stdout are set then
	err     error
	cmd     *exec.Cmd
	stdinMu sync.Mutex // one message (and its "\n") at a time into stdin
	stdin   *os.File
	stdout  *os.File
	once    sync.Once
}

func (r *room) start(argv []string) {
	defer close(r.started)
	inR, inW, err := os.Pipe()
	if err != nil {
		r.err = err
		return
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		r.err = err
		return
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, os.Stderr
	err = cmd.Start()
	inR.Close() // the child's ends
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		r.err = err
		return
	}
	r.cmd, r.stdin, r.stdout = cmd, inW, outR
	go r.pump()
}

// pump broadcasts every line the child prints to the room's clients.
func (r *room) pump() {
	br := bufio.NewReaderSize(r.stdout, 1<<16)
	// A line longer than br's buffer is gathered here, and the buffer reused
	// (NewPreparedMessage copies the line into the frame).
	var long []byte
	for {
		chunk, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			if len(long)+len(chunk) > lineLimit {
				log.Printf("a line of the child's output is over %d bytes; no longer reading its output", lineLimit)
				return // stdout stays open (unread) until the room stops
			}
			long = append(long, chunk...)
			continue
		}
		line := chunk
		if len(long) > 0 {
			long = append(long, chunk...)
			line, long = long, long[:0]
		}
		if len(line) > 0 {
			if line[len(line)-1] == '\n' {
				line = line[:len(line)-1]
			}
			// Framed once; NewPreparedMessage copies line into the frame.
			pm, perr := websocket.NewPreparedMessage(websocket.TextMessage, line)
			if perr == nil {
				r.mu.Lock()
				for c := range r.clients {
					c.send(pm)
				}
				r.mu.Unlock()
			}
		}
		if err != nil { // EOF: the child is gone (or stop closed stdout)
			return
		}
	}
}

// stop kills the child and reaps it (once; after start has run).
func (r *room) stop() {
	r.once.Do(func() {
		<-r.started
		if r.cmd == nil {
			return
		}
		r.stdin.Close()
		r.cmd.Process.Kill()
		r.cmd.Wait()
		r.stdout.Close() // ends the pump if something else still held the pipe
	})
}

// hub is all the rooms; it serves each connection.
type hub struct {
	cmd   []string
	mu    sync.Mutex // guards rooms, and each room's emptiness with it
	rooms map[string]*room
}

func (h *hub) join(name string, c *client) *room {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.rooms[name]
	if r == nil {
		// Registered before the child starts, so concurrent first clients
		// of a room share one child; start runs outside the lock.
		r = &room{clients: make(map[*client]struct{}), started: make(chan struct{})}
		h.rooms[name] = r
		go r.start(h.cmd)
	}
	r.mu.Lock()
	r.clients[c] = struct{}{}
	r.mu.Unlock()
	return r
}

func (h *hub) leave(name string, r *room, c *client) {
	h.mu.Lock()
	r.mu.Lock()
	delete(r.clients, c)
	last := len(r.clients) == 0 && h.rooms[name] == r
	r.mu.Unlock()
	if last {
		delete(h.rooms, name)
	}
	h.mu.Unlock()
	c.kill()
	if last {
		r.stop()
	}
}

func (h *hub) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	ws, err := upgrader.Upgrade(w, req, nil)
	if err != nil {
		return // Upgrade has answered with an HTTP error
	}
	ws.SetReadLimit(maxSize)
	// The room is the raw path, as websockets' request.path.
	name := strings.TrimLeft(strings.SplitN(req.RequestURI, "?", 2)[0], "/")
	c := &client{ws: ws}
	r := h.join(name, c)
	defer h.leave(name, r, c)
	<-r.started
	if r.err != nil {
		log.Printf("cannot start %q: %v", h.cmd, r.err)
		ws.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(websocket.CloseInternalServerErr, ""), time.Now().Add(time.Second))
		return
	}
	for {
		// A message is read whole (as websockets does) before it goes into
		// stdin, into a pooled buffer: less garbage with big messages.
		buf := msgBufs.Get().(*bytes.Buffer)
		buf.Reset()
		_, rd, err := ws.NextReader()
		if err == nil {
			_, err = buf.ReadFrom(rd)
		}
		if err != nil {
			msgBufs.Put(buf)
			if _, ok := err.(*websocket.CloseError); !ok {
				// Not the client's close (gorilla answers that): a protocol
				// error or a message over the limit, whose close frame gorilla
				// has sent. Read on until the client closes, 2 s at most (as
				// websockets' close_timeout), lest closing with its data
				// unread resets the connection before it has read ours.
				nc := ws.UnderlyingConn()
				nc.SetReadDeadline(time.Now().Add(2 * time.Second))
				io.Copy(io.Discard, nc)
			}
			return
		}
		buf.WriteByte('\n')
		r.stdinMu.Lock()
		_, err = r.stdin.Write(buf.Bytes()) // blocks while the child is behind: backpressure
		r.stdinMu.Unlock()
		msgBufs.Put(buf)
		if err != nil {
			return
		}
	}
}

// shutdown closes every connection (1001, going away) and stops every room.
func (h *hub) shutdown() {
	h.mu.Lock()
	var rooms []*room
	var clients []*client
	for name, r := range h.rooms {
		rooms = append(rooms, r)
		r.mu.Lock()
		for c := range r.clients {
			clients = append(clients, c)
		}
		r.mu.Unlock()
		delete(h.rooms, name)
	}
	h.mu.Unlock()
	var wg sync.WaitGroup
	deadline := time.Now().Add(time.Second)
	msg := websocket.FormatCloseMessage(websocket.CloseGoingAway, "")
	for _, c := range clients {
		wg.Add(1)
		go func(c *client) {
			defer wg.Done()
			c.ws.WriteControl(websocket.CloseMessage, msg, deadline)
			c.kill()
		}(c)
	}
	wg.Wait()
	for _, r := range rooms {
		r.stop()
	}
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("scalesocket-go: ")
	addr := flag.String("addr", "127.0.0.1:9000", "HOST:PORT (port 0 picks a free one)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [--addr HOST:PORT] CMD [ARG...]\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	h := &hub{cmd: flag.Args(), rooms: make(map[string]*room)}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintf(os.Stderr, "listening on %s\n", ln.Addr())
	srv := &http.Server{Handler: h, ErrorLog: log.Default()}
	go func() {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()
	<-sigs
	srv.Close() // the listener; upgraded connections are ours to close
	h.shutdown()
}
