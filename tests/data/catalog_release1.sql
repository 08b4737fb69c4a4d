-- A catalog written by release 1 (storage/catalog.py at ad314b5, schema_version 1).
BEGIN TRANSACTION;
CREATE TABLE archives (
	id INTEGER NOT NULL, 
	target_id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	size BIGINT NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	file_name TEXT NOT NULL, 
	fingerprint VARCHAR(64), 
	deleted_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(target_id) REFERENCES targets (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id)
);
INSERT INTO "archives" VALUES(1,1,1,'2026-11-20 12:00:00.000000',1234,'abababababababababababababababababababababababababababababababab','1/20261120T120000Z-1.tar.gz','cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd',NULL);
CREATE TABLE nodes (
	id INTEGER NOT NULL, 
	user VARCHAR(64) NOT NULL, 
	host VARCHAR(255) NOT NULL, 
	port INTEGER NOT NULL, 
	host_key_type VARCHAR(64), 
	host_key_b64 TEXT, 
	host_key_fingerprint VARCHAR(128), 
	reachable BOOLEAN, 
	last_error TEXT, 
	last_seen_at DATETIME, 
	unreachable_since DATETIME, 
	probe_attempts INTEGER NOT NULL, 
	next_probe_at DATETIME, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_nodes_address UNIQUE (user, host, port)
);
INSERT INTO "nodes" VALUES(1,'backup','127.0.0.1',2222,'ssh-ed25519','AAAAC3NzaC1lZDI1NTE5AAAAIExample','SHA256:example',NULL,NULL,NULL,NULL,0,NULL,'2026-11-20 12:00:00.000000');
CREATE TABLE runs (
	id INTEGER NOT NULL, 
	target_id INTEGER NOT NULL, 
	scheduled_at DATETIME, 
	started_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	status VARCHAR(16) NOT NULL, 
	"trigger" VARCHAR(16) NOT NULL, 
	bytes_transferred BIGINT NOT NULL, 
	archive_id INTEGER, 
	error_code VARCHAR(64), 
	message TEXT, 
	warnings TEXT, 
	fingerprint VARCHAR(64), 
	PRIMARY KEY (id), 
	FOREIGN KEY(target_id) REFERENCES targets (id)
);
INSERT INTO "runs" VALUES(1,1,'2026-11-20 12:00:00.000000','2026-11-20 12:00:00.000000','2026-11-20 12:00:00.000000','success','scheduled',1200,1,NULL,NULL,NULL,'cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd');
INSERT INTO "runs" VALUES(2,2,NULL,'2026-11-20 12:00:00.000000','2026-11-20 12:00:00.000000','failed','manual',0,NULL,'unreachable','no route',NULL,NULL);
CREATE TABLE schema_version (
	version INTEGER NOT NULL
);
INSERT INTO "schema_version" VALUES(1);
CREATE TABLE targets (
	id INTEGER NOT NULL, 
	node_id INTEGER NOT NULL, 
	path TEXT NOT NULL, 
	every_minutes INTEGER NOT NULL, 
	keep INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	unregistered_at DATETIME, 
	last_fingerprint VARCHAR(64), 
	failures INTEGER NOT NULL, 
	next_retry_at DATETIME, 
	last_run_id INTEGER, 
	PRIMARY KEY (id), 
	FOREIGN KEY(node_id) REFERENCES nodes (id)
);
INSERT INTO "targets" VALUES(1,1,'/srv/data',60,10,'2026-11-20 12:00:00.000000',NULL,'cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd',0,NULL,1);
INSERT INTO "targets" VALUES(2,1,'/etc',1440,3,'2026-11-20 12:00:00.000000','2026-11-20 12:00:00.000000',NULL,0,NULL,2);
CREATE UNIQUE INDEX uq_targets_active ON targets (node_id, path) WHERE unregistered_at IS NULL;
CREATE INDEX ix_runs_target_id ON runs (target_id);
CREATE INDEX ix_runs_status ON runs (status);
CREATE INDEX ix_archives_retained ON archives (target_id) WHERE deleted_at IS NULL;
CREATE INDEX ix_archives_target_id ON archives (target_id);
COMMIT;
