// A JDBC client (pgjdbc, Debian's libpostgresql-jdbc-java) through the proxy: verify-full TLS,
// SCRAM, simple + prepared statements, batches, and the proxy's refusals as SQLStates.
// Run by tests/e2e_jdbc.rs: java -cp postgresql.jar JdbcSmoke.java <port> <ca.crt> <password>
import java.sql.*;
import java.util.Properties;

public class JdbcSmoke {
    static Connection connect(String port, String ca, String user, String password) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", user);
        p.setProperty("password", password);
        p.setProperty("sslmode", "verify-full");
        p.setProperty("sslrootcert", ca);
        p.setProperty("connectTimeout", "10");
        return DriverManager.getConnection("jdbc:postgresql://localhost:" + port + "/app", p);
    }

    public static void main(String[] a) throws Exception {
        String port = a[0], ca = a[1], pw = a[2];
        try (Connection c = connect(port, ca, "app", pw)) {
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select current_user")) {
                r.next();
                System.out.println("user=" + r.getString(1));
            }
            try (PreparedStatement ps = c.prepareStatement("select ?::int * 2")) {
                int sum = 0;
                for (int i = 0; i < 10; i++) { // past pgjdbc's prepareThreshold: server-side prepared
                    ps.setInt(1, i);
                    try (ResultSet r = ps.executeQuery()) { r.next(); sum += r.getInt(1); }
                }
                System.out.println("prepared_sum=" + sum);
            }
            try (Statement s = c.createStatement()) {
                s.execute("create temp table j (id int, v text)");
            }
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("insert into j values (?, ?)")) {
                for (int i = 0; i < 1000; i++) { ps.setInt(1, i); ps.setString(2, "v" + i); ps.addBatch(); }
                int[] n = ps.executeBatch();
                System.out.println("batch=" + n.length);
            }
            c.commit();
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select count(*) from j")) {
                r.next();
                System.out.println("count=" + r.getLong(1));
            }
        }
        for (String[] t : new String[][] {{"postgres", pw}, {"app", "wrong"}}) {
            try (Connection c = connect(port, ca, t[0], t[1])) {
                System.out.println("unexpected_login=" + t[0]);
            } catch (SQLException e) {
                System.out.println("refused " + t[0] + " " + e.getSQLState() + " " + e.getMessage());
            }
        }
    }
}
