// goproxy: the plain Go TCP proxy countless tools are written as — io.Copy both ways between two
// *net.TCPConn. On Linux, io.Copy reaches TCPConn.ReadFrom, which reads the source with
// splice(2): the workload meshlane's splice guard exists for.
//
//	goproxy LISTEN UPSTREAM
package main

import (
	"fmt"
	"io"
	"net"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: goproxy LISTEN UPSTREAM")
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("listening", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go serve(c.(*net.TCPConn), os.Args[2])
	}
}

func serve(c *net.TCPConn, upstream string) {
	defer c.Close()
	u, err := net.Dial("tcp", upstream)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	up := u.(*net.TCPConn)
	defer up.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(up, c) // splice(c → pipe → up)
		up.CloseWrite()
		close(done)
	}()
	io.Copy(c, up) // splice(up → pipe → c)
	c.CloseWrite()
	<-done
}
