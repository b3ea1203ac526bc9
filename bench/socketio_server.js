// socket.io 4 on Node: the peer of muxserver's WebSocket benchmarks (bench/wsload.py).
//
// Every socket joins one room on connect; an "m" event is broadcast to that
// room: to everyone but the sender (socket.to), or, for a socket that
// connected with ?echo=1 (the 50 <-> 50 mesh), to everyone (io.to), the way
// muxserver's EMIT echo flag does equal work. WebSocket transport only, no
// per-message deflate, heartbeats far apart (receivers only count bytes).
// `make bench-deps` installs socket.io into .bench-node/ (NODE_PATH).
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 0);
const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  perMessageDeflate: false,
  serveClient: false,
  pingInterval: 3600000,
  pingTimeout: 3600000,
});
io.on("connection", (socket) => {
  socket.join("bench");
  const to = socket.handshake.query.echo === "1" ? io.to("bench") : socket.to("bench");
  socket.on("m", (data) => to.emit("m", data));
});
httpServer.listen(port, "127.0.0.1", () => {
  const { version } = require("socket.io/package.json");
  console.log(`socket.io ${version} listening on 127.0.0.1:${httpServer.address().port}`);
});
