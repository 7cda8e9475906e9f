//! A small web app for the postgres plugin's tests: it connects with nothing but the
//! environment keter gave it, records its `--note` in a table, and serves the table.
//!
//! ```text
//! pgapp [--note TEXT]
//! ```
//!
//! At start it connects with `PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE`, checks that
//! `DATABASE_URL` and `PGPASS` name the same role, database and password, creates the table
//! `notes` if needed and inserts the note. It exits with an error otherwise, which fails the
//! deploy. Over HTTP on `127.0.0.1:$PORT`: `/` answers the notes in insertion order, joined by
//! `,`; `/whoami` answers `ROLE DATABASE`; `/via` how the server sees the session of the PG*
//! variables: `socket` over a unix socket, else `tcp` and the server's address. One connection
//! at a time, each closed after its answer: enough for tests.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::str::FromStr;

use postgres::{Client, NoTls};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fail(&format!("{name} is not set")))
}

fn fail(why: &str) -> ! {
    eprintln!("pgapp: {why}");
    std::process::exit(1)
}

fn connect_from_parts() -> Client {
    let port: u16 = var("PGPORT")
        .parse()
        .unwrap_or_else(|_| fail("PGPORT is not a port"));
    postgres::Config::new()
        .host(&var("PGHOST"))
        .port(port)
        .user(&var("PGUSER"))
        .password(var("PGPASSWORD"))
        .dbname(&var("PGDATABASE"))
        .connect(NoTls)
        .unwrap_or_else(|e| fail(&format!("cannot connect with the PG* variables: {e}")))
}

fn whoami(client: &mut Client) -> String {
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .unwrap_or_else(|e| fail(&format!("query failed: {e}")));
    format!("{} {}", row.get::<_, String>(0), row.get::<_, String>(1))
}

fn main() {
    let mut note = "note".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--note" => note = args.next().unwrap_or_else(|| fail("--note TEXT")),
            other => eprintln!("pgapp: ignoring unknown argument {other}"),
        }
    }
    if var("PGPASS") != var("PGPASSWORD") {
        fail("PGPASS and PGPASSWORD differ");
    }
    let mut client = connect_from_parts();
    let me = whoami(&mut client);
    let url = postgres::Config::from_str(&var("DATABASE_URL"))
        .unwrap_or_else(|e| fail(&format!("DATABASE_URL does not parse: {e}")));
    let mut by_url = url
        .connect(NoTls)
        .unwrap_or_else(|e| fail(&format!("cannot connect with DATABASE_URL: {e}")));
    if whoami(&mut by_url) != me {
        fail("DATABASE_URL names another role or database than the PG* variables");
    }
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL)",
        )
        .unwrap_or_else(|e| fail(&format!("cannot create the table: {e}")));
    client
        .execute("INSERT INTO notes (body) VALUES ($1)", &[&note])
        .unwrap_or_else(|e| fail(&format!("cannot insert: {e}")));
    println!("pgapp: connected as {me}, recorded {note:?}");

    let port = var("PORT");
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))
        .unwrap_or_else(|e| fail(&format!("cannot listen on port {port}: {e}")));
    for stream in listener.incoming().flatten() {
        serve(stream, &mut client, &me);
    }
}

fn serve(stream: TcpStream, client: &mut Client, me: &str) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header.trim_end().is_empty() => break,
            Ok(_) => {}
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = if target == "/whoami" {
        (200, format!("{me}\n"))
    } else if target == "/via" {
        // The server's own view: no server address for a unix socket.
        match client.query_one("SELECT host(inet_server_addr())", &[]) {
            Ok(row) => match row.get::<_, Option<String>>(0) {
                None => (200, "socket\n".to_string()),
                Some(addr) => (200, format!("tcp {addr}\n")),
            },
            Err(e) => (500, format!("query failed: {e}\n")),
        }
    } else {
        match client.query("SELECT body FROM notes ORDER BY id", &[]) {
            Ok(rows) => {
                let notes: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                (200, format!("{}\n", notes.join(",")))
            }
            Err(e) => (500, format!("query failed: {e}\n")),
        }
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = stream;
    let _ = out.write_all(response.as_bytes());
}
